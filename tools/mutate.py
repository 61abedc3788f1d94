"""Mutation testing over named, hand-picked mutants: would the fast tests notice a plausible wrong model?

    python tools/mutate.py                       # every mutant, on a snapshot of HEAD (committed files)
    python tools/mutate.py --only model          # one group (model, ops, numerics, ema, resume, eval)
    python tools/mutate.py --only gate_dropped   # one mutant
    python tools/mutate.py --worktree            # the working tree instead of HEAD (uncommitted edits too)
    python tools/mutate.py --list

Each mutant is one small edit (file, old snippet, new snippet) of the kind a refactor could make by mistake.
The repository is copied to a temporary directory once; each mutant is applied there, the fast tests that
should catch it run (`pytest -x`, CPU), and the file is restored. A mutant is *caught* when those tests fail,
*survived* when they pass, *stale* when its snippet is no longer in the file (update the list). Before the
mutants, the union of the test selections runs on the unmutated copy and must pass.

Why not mutmut: it mutates every operator of every line blindly and needs the whole suite per mutant; the
suite's relevant fast tests take ~10-60 s per mutant here, so a few hundred blind mutants would take hours on
2 cores, and most of them (log messages, error strings) say nothing about whether the model is right.
Results and the survivors' explanations: docs/TESTING.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

REF = "tests/reference/test_reference_model.py"
REF_TORCH = [REF, "-k", "every_scan and torch"]
NUMERICS = "tests/train/test_numerics.py"
SCAN_TRITON = "tests/ops/test_scan_triton.py"
IGEMM = "tests/ops/test_fusion_igemm.py"
FUSION_TRITON = "tests/ops/test_fusion_triton.py"
FFT = "tests/ops/test_fusion_fft.py"


@dataclass
class Mutant:
    name: str
    group: str
    path: str
    old: str
    new: str
    tests: list[str]
    why: str = ""


M = Mutant
MUTANTS = [
    # --- the model -----------------------------------------------------------------------------------------
    M("bwd_not_flipped_back", "model", "msf_scale/models/blocks.py",
      "self.bwd(xs.flip(-1), self.scan_backend).flip(-1)", "self.bwd(xs.flip(-1), self.scan_backend)", REF_TORCH),
    M("bwd_scans_forwards", "model", "msf_scale/models/blocks.py",
      "self.bwd(xs.flip(-1), self.scan_backend).flip(-1)", "self.bwd(xs, self.scan_backend)", REF_TORCH),
    M("gate_dropped", "model", "msf_scale/models/blocks.py",
      "y = 0.5 * y * F.silu(z)", "y = 0.5 * y", REF_TORCH),
    M("directions_summed", "model", "msf_scale/models/blocks.py",
      "y = 0.5 * y * F.silu(z)", "y = y * F.silu(z)", REF_TORCH),
    M("fusion_grid_T_W_swapped", "model", "msf_scale/models/blocks.py",
      "states = tokens.transpose(1, 2).reshape(b, d, *grid)", "states = tokens.transpose(1, 2).reshape(b, d, *grid[::-1])",
      REF_TORCH),
    M("fusion_residual_dropped", "model", "msf_scale/models/blocks.py",
      "h = torch.cat([prefix, tokens + fused], dim=1)", "h = torch.cat([prefix, fused], dim=1)", REF_TORCH),
    M("cpu_conv1d_taps_reversed", "model", "msf_scale/ops/causal_conv1d.py",
      "w = weight[:, 0, :].to(x.dtype)", "w = weight[:, 0, :].flip(-1).to(x.dtype)", REF_TORCH),
    M("x_proj_B_C_swapped", "model", "msf_scale/models/blocks.py",
      "dt, B, C = torch.bmm(self.x_proj", "dt, C, B = torch.bmm(self.x_proj", REF_TORCH),
    M("dt_bias_dropped", "model", "msf_scale/models/blocks.py",
      "self.D.float(), None, self.dt_proj.bias.float(),", "self.D.float(), None, None,", REF_TORCH),
    M("aswm_softmax_over_width", "model", "msf_scale/models/blocks.py",
      "torch.softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=1)",
      "torch.softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)", REF_TORCH),
    M("drop_path_no_rescale", "model", "msf_scale/models/blocks.py",
      "return x * x.new_empty(shape).bernoulli_(1 - self._p) / (1 - self._p)",
      "return x * x.new_empty(shape).bernoulli_(1 - self._p)", [NUMERICS, "-k", "drop_path"]),
    M("compiled_drop_path_no_rescale", "model", "msf_scale/models/blocks.py",
      "return x * (torch.rand(shape, device=x.device) >= rate) / (1 - rate)",
      "return x * (torch.rand(shape, device=x.device) >= rate)", ["tests/models/test_compile_guards.py", "-k", "drop_path"]),
    M("compiled_drop_path_rate_a_guard", "model", "msf_scale/models/blocks.py",
      "rate = self.rate.float()", "rate = self._p", ["tests/models/test_compile_guards.py"]),
    M("temporal_embedding_dropped", "model", "msf_scale/models/msf_mamba.py",
      "x + self.pos_embed[:, None] + self.temporal_pos_embedding", "x + self.pos_embed[:, None]", REF_TORCH),
    M("mean_pool_includes_cls", "model", "msf_scale/models/msf_mamba.py",
      "tokens = x[:, self.num_prefix:]", "tokens = x", REF_TORCH),
    M("fusion_every_K_off_by_one", "model", "msf_scale/models/msf_mamba.py",
      "list(range(n - 1, self.depth, n))", "list(range(n, self.depth, n))", [REF, "-k", "fusion_blocks"]),
    M("flops_without_scan_factor", "model", "msf_scale/models/msf_mamba.py",
      "9 * e * n + e)", "e * n + e)", [REF, "-k", "flops"]),
    M("default_fusion_init_uniform", "model", "msf_scale/models/msf_mamba.py",
      'fusion_init: str = "zero"', 'fusion_init: str = "uniform"', [REF, "-k", "defaults or init_follows"]),
    M("default_theta_changed", "model", "msf_scale/models/msf_mamba.py",
      "fusion_theta: float = 0.7", "fusion_theta: float = 0.5", [REF, "-k", "defaults or init_follows"]),
    M("A_init_shifted", "model", "msf_scale/models/blocks.py",
      "torch.log(torch.arange(1, n + 1, dtype=torch.float32))", "torch.log(torch.arange(2, n + 2, dtype=torch.float32))",
      [REF, "-k", "defaults or init_follows"]),
    M("D_init_zero", "model", "msf_scale/models/blocks.py",
      "self.D.fill_(1.0)", "self.D.fill_(0.0)", [REF, "-k", "defaults or init_follows"]),
    M("out_proj_not_scaled_by_depth", "model", "msf_scale/models/msf_mamba.py",
      "p.div_(math.sqrt(cfg.depth))", "pass", [REF, "-k", "defaults or init_follows"]),
    M("fusion_norm_skipped", "model", "msf_scale/models/blocks.py",
      "                h = self.fusion_norm(h)\n", "                pass\n", REF_TORCH),
    M("residual_stream_not_fp32", "model", "msf_scale/models/msf_mamba.py",
      "            x = x.float()\n", "            pass\n", [REF, "-k", "fp32_under_bf16"],
      "equivalent: adding the fp32 position embeddings already promotes the bf16 patch tokens to fp32"),
    M("dt_bias_not_inverse_softplus", "model", "msf_scale/models/blocks.py",
      "self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))", "self.dt_proj.bias.copy_(dt)", [REF, "-k", "defaults or init_follows"]),
    M("norm_eps_default_changed", "model", "msf_scale/models/msf_mamba.py",
      "norm_eps: float = 1e-5", "norm_eps: float = 1e-6", [REF, "-k", "defaults or init_follows"]),
    # --- the operators -------------------------------------------------------------------------------------
    M("cfd_theta_sign", "ops", "msf_scale/ops/_cfd.py",
      "return weight - theta * off_centre[..., None, None, None] * centre",
      "return weight + theta * off_centre[..., None, None, None] * centre", ["tests/ops/test_state_fusion.py"]),
    M("cfd_centre_frame_in_sum", "ops", "msf_scale/ops/_cfd.py",
      "off_centre = weight.sum(dim=(-1, -2, -3)) - weight[..., c, :, :].sum(dim=(-1, -2))",
      "off_centre = weight.sum(dim=(-1, -2, -3))", ["tests/ops/test_state_fusion.py"]),
    M("shift_conv_mirrored_time", "ops", "msf_scale/ops/state_fusion.py",
      "tap = w[:, 0, i, j, l].view(1, -1, 1, 1, 1)", "tap = w[:, 0, k - 1 - i, j, l].view(1, -1, 1, 1, 1)",
      ["tests/ops/test_state_fusion.py"]),
    M("fusion_ref_sign", "ops", "msf_scale/ops/state_fusion.py",
      "out.append(agg - theta * h * off_centre.to(h.dtype))", "out.append(agg + theta * h * off_centre.to(h.dtype))",
      ["tests/ops/test_state_fusion.py", REF, "-k", "every_fusion"]),
    M("numba_path_D_skip_dropped", "ops", "msf_scale/ops/_scan_numba.py",
      "y = y + u * D[:, None]", "y = y", ["tests/ops/test_selective_scan.py", "-k", "numba"]),
    M("numba_path_softplus_dropped", "ops", "msf_scale/ops/_scan_numba.py",
      "delta = F.softplus(delta)", "delta = delta", ["tests/ops/test_selective_scan.py", "-k", "numba"]),
    M("scan_ref_input_not_scaled_by_delta", "ops", "msf_scale/ops/scan.py",
      "h = torch.exp(dt * A) * h + dt * B[..., t] * u[:, :, t, None]",
      "h = torch.exp(dt * A) * h + B[..., t] * u[:, :, t, None]", [REF, "-k", "every_scan and ref"]),
    M("torch_scan_log2e_off", "ops", "msf_scale/ops/_scan_torch.py",
      "LOG2E = 1.0 / math.log(2.0)", "LOG2E = 1.0 / math.log(2.01)",
      ["tests/ops/test_selective_scan.py", "-k", "torch and reference"]),
    M("torch_scan_chunk_carry_without_decay", "ops", "msf_scale/ops/_scan_torch.py",
      "torch.addcmul(h[:, k], decay[r0:r1, k0 + k], h_in[:, k], out=h_in[:, k + 1])",
      "torch.add(h[:, k], h_in[:, k], out=h_in[:, k + 1])", ["tests/ops/test_selective_scan.py", "-k", "torch and reference"]),
    M("torch_scan_horner_wrong_decay", "ops", "msf_scale/ops/_scan_torch.py",
      "torch.addcmul(hs[j], g0, ws[j + 1], out=g0)", "torch.addcmul(hs[j], g0, ws[j], out=g0)",
      ["tests/ops/test_selective_scan.py", "-k", "torch and reference"]),
    M("numba_adjoint_not_decayed", "ops", "msf_scale/ops/_scan_numba.py",
      "gh[n] = g * a", "gh[n] = g", ["tests/ops/test_selective_scan.py", "-k", "numba and reference"]),
    M("numba_gdelta_without_A_term", "ops", "msf_scale/ops/_scan_numba.py",
      "gdelta[b, d, t] = s_b * uu + s_a", "gdelta[b, d, t] = s_b * uu",
      ["tests/ops/test_selective_scan.py", "-k", "numba and reference"]),
    # --- training numerics ---------------------------------------------------------------------------------
    M("label_smoothing_off", "numerics", "msf_scale/train_steps.py",
      "nn.CrossEntropyLoss(label_smoothing=run.cfg.optim.label_smoothing)", "nn.CrossEntropyLoss()",
      [NUMERICS, "-k", "hand_computation"]),
    M("grad_clipping_removed", "numerics", "msf_scale/train_steps.py",
      "acc.clip_grad_norm_(run.model.parameters(), run.cfg.optim.clip_grad)", "pass", [NUMERICS, "-k", "hand_computation"]),
    M("scheduler_stepped_twice", "numerics", "msf_scale/train_steps.py",
      "            run.scheduler.step()\n", "            run.scheduler.step()\n            run.scheduler.step()\n",
      [NUMERICS, "-k", "hand_computation"]),
    M("loss_not_divided_by_accumulation", "numerics", "msf_scale/train_steps.py",
      "acc.backward(loss)", "acc.backward(loss * run.accum)", [NUMERICS, "-k", "hand_computation"]),
    M("warmup_starts_at_zero", "numerics", "msf_scale/optim.py",
      "return (step + 1) / warmup", "return step / warmup", ["tests/train/test_optim.py"]),
    M("cosine_quarter_period", "numerics", "msf_scale/optim.py",
      "0.5 * (1 + math.cos(math.pi * progress))", "0.5 * (1 + math.cos(0.5 * math.pi * progress))",
      [NUMERICS, "-k", "hand_computation"]),
    M("lr_not_scaled_by_batch", "numerics", "msf_scale/optim.py",
      "return cfg.optim.lr * global_batch / 256", "return cfg.optim.lr", ["tests/train/test_optim.py"]),
    M("weight_decay_on_1d_params", "numerics", "msf_scale/optim.py",
      "decay = p.ndim > 1 and name not in skip", "decay = name not in skip", ["tests/train/test_optim.py"]),
    # --- EMA -----------------------------------------------------------------------------------------------
    M("ema_update_noop", "ema", "msf_scale/ema.py",
      "p.lerp_(src[name].detach().to(p.dtype), 1 - d)", "p.lerp_(src[name].detach().to(p.dtype), 0.0)",
      [NUMERICS, "-k", "ema_update"]),
    M("ema_decay_inverted", "ema", "msf_scale/ema.py",
      "p.lerp_(src[name].detach().to(p.dtype), 1 - d)", "p.lerp_(src[name].detach().to(p.dtype), d)",
      [NUMERICS, "-k", "ema_update"]),
    M("ema_no_warmup", "ema", "msf_scale/ema.py",
      "d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))", "d = self.decay",
      [NUMERICS, "-k", "ema_update"]),
    M("ema_not_restored_on_resume", "ema", "msf_scale/train_setup.py",
      "        acc.register_for_checkpointing(ema)\n", "        pass\n", [NUMERICS, "-k", "ema_resumes"]),
    # --- resume --------------------------------------------------------------------------------------------
    M("truncate_jsonl_noop", "resume", "msf_scale/metrics.py",
      'Path(path).write_text("".join(json.dumps(r) + "\\n" for r in rows if r.get("step", 0) <= max_step))', "pass",
      [NUMERICS, "-k", "truncate", "tests/train/test_train_run.py", "-k", "truncate or resume_auto"]),
    M("no_remap_when_batch_changes", "resume", "msf_scale/train_setup.py",
      "state.batch_in_epoch = state.batch_in_epoch * state.clips_per_batch // per_batch", "pass",
      [NUMERICS, "-k", "remaps"]),
    M("resolve_resume_path_like_auto", "resume", "msf_scale/checkpoint.py",
      "    p = Path(resume)\n", "    p = Path(resume)\n    return latest_checkpoint(run_dir)\n",
      [NUMERICS, "-k", "resolve_resume"]),
    # --- what a run reports --------------------------------------------------------------------------------
    M("train_flops_not_tripled", "eval", "msf_scale/metrics.py",
      "return 3 * 2 * int(forward_macs)", "return 2 * int(forward_macs)", [NUMERICS, "-k", "flops_and_mfu"]),
    M("keep_last_off_by_one", "resume", "msf_scale/checkpoint.py",
      "for old in list_checkpoints(run_dir)[:-keep_last]:", "for old in list_checkpoints(run_dir)[:-keep_last - 1]:",
      ["tests/train/test_train_run.py", "-k", "run_dir_and_export"]),
    M("train_flip_vertical", "eval", "msf_scale/data/transforms.py",
      "        x = x.flip(-1)\n", "        x = x.flip(-2)\n", ["tests/data/test_views_values.py", "-k", "flip"]),
    M("topk_off_by_one", "eval", "msf_scale/metrics.py",
      "return [hit[:, :k].any(dim=-1) for k in ks]", "return [hit[:, :k + 1].any(dim=-1) for k in ks]",
      [NUMERICS, "-k", "topk", "tests/train/test_eval_values.py"]),
    M("eval_first_view_only", "eval", "msf_scale/evaluate.py",
      "probs = logits.float().softmax(-1).view(b, v, -1).mean(1)", "probs = logits.float().softmax(-1).view(b, v, -1)[:, 0]",
      ["tests/train/test_eval_values.py"]),
    M("eval_averages_logits", "eval", "msf_scale/evaluate.py",
      "probs = logits.float().softmax(-1).view(b, v, -1).mean(1)", "probs = logits.float().view(b, v, -1).mean(1)",
      ["tests/train/test_eval_values.py"]),
    M("eval_crops_all_centre", "eval", "msf_scale/data/transforms.py",
      "offs = [spare // 2] if num_crops == 1 else [round(spare * j / (num_crops - 1)) for j in range(num_crops)]",
      "offs = [spare // 2] * num_crops", ["tests/data/test_views_values.py"]),
    M("eval_crop_axes_swapped", "eval", "msf_scale/data/transforms.py",
      "return [(o, 0, s, s) if h > w else (0, o, s, s) for o in offs]",
      "return [(0, o, s, s) if h > w else (o, 0, s, s) for o in offs]", ["tests/data/test_views_values.py"]),
    M("eval_clip_offset_at_segment_start", "eval", "msf_scale/data/transforms.py",
      "[(clip + 0.5) / num_clips] * t", "[clip / num_clips] * t", ["tests/data/test_views_values.py"]),
    M("mp4_decodes_bgr", "eval", "msf_scale/data/video.py",
      'reformat(frame, width=width, height=height, format="rgb24"', 'reformat(frame, width=width, height=height, format="bgr24"',
      ["tests/data/test_views_values.py"]),
    # --- session 5: the grouped scan, the pooling and input options ------------------------------------------
    M("grouped_bwd_not_flipped_back", "model", "msf_scale/models/blocks.py",
      "(y_bwd if reverse else y_bwd.flip(-1))", "y_bwd", ["tests/ops/test_grouped_scan.py"]),
    # --- session 11: transposed projections, the chunked triton forward, freezing ------------------------------
    M("grouped_projection_weights_of_one_direction", "model", "msf_scale/models/blocks.py",
      "return w.expand(batch, *w.shape).reshape(batch * 2, *w.shape[1:])",
      "return w[:1].expand(batch * 2, *w.shape[1:])", ["tests/ops/test_grouped_scan.py"]),
    M("scan_triton_chunk_includes_itself", "ops", "msf_scale/ops/_scan_triton.py",
      "h = tl.where(cc < c,", "h = tl.where(cc <= c,", [SCAN_TRITON, "-k", "matches_ref"]),
    M("scan_triton_chunk_decay_not_carried", "ops", "msf_scale/ops/_scan_triton.py",
      "        p *= dl\n", "", [SCAN_TRITON, "-k", "matches_ref or past_the_sequence"]),
    M("freeze_not_applied", "model", "msf_scale/inference.py",
      "patch(freezing=True) if freeze", "patch(freezing=False) if freeze",
      ["tests/measure/test_latency.py", "-k", "freeze"]),
    M("per_group_reads_group_0", "ops", "msf_scale/ops/scan.py",
      "*map(split, (u, delta, A)), B.unbind(1), C.unbind(1),", "*map(split, (u, delta, A)), [B[:, 0]] * groups, C.unbind(1),",
      ["tests/ops/test_grouped_scan.py"]),
    M("ref_groups_interleaved", "ops", "msf_scale/ops/scan.py",
      "bc.repeat_interleave(dim // bc.shape[1], dim=1)", "bc.repeat(1, dim // bc.shape[1], 1, 1)",
      ["tests/ops/test_grouped_scan.py"]),
    M("max_pool_is_mean", "model", "msf_scale/models/msf_mamba.py",
      'x = tokens.amax(dim=1) if pool == "max" else tokens.mean(dim=1)', "x = tokens.mean(dim=1)",
      ["tests/models/test_input_pool_options.py"]),
    M("frame_diff_wraps_around", "model", "msf_scale/models/stem.py",
      "torch.diff(x, dim=2, prepend=x[:, :, :1])", "torch.diff(x, dim=2, prepend=x[:, :, -1:])",
      ["tests/models/test_input_pool_options.py"]),
    # --- session 8: the igemm fusion backend (Triton kernels under the interpreter), the inference caches ------------
    M("igemm_dh_kernel_not_flipped_in_time", "ops", "msf_scale/ops/_fusion_igemm.py",
      "w.reshape(c, k, k, k).flip(1, 2, 3)", "w.reshape(c, k, k, k).flip(2, 3)", [IGEMM, "-k", "float64"]),
    M("igemm_band_window_row_short", "ops", "msf_scale/ops/_fusion_igemm.py",
      "& (oy >= 0) & (oy < k) &", "& (oy >= 0) & (oy < k - 1) &", [IGEMM, "-k", "float64"]),
    M("igemm_a_tile_frame_off_by_one", "ops", "msf_scale/ops/_fusion_igemm.py",
      "tt = t + (OT - R)", "tt = t + (OT - R + 1)", [IGEMM, "-k", "float64"]),
    M("igemm_a_tile_reads_past_its_rows", "ops", "msf_scale/ops/_fusion_igemm.py",
      "mask=m[:, None] & nmask[None, :], other=0.0)", "mask=m[:, None], other=0.0)", [IGEMM, "-k", "outside"]),
    M("igemm_flat_bands_not_centred", "ops", "msf_scale/ops/_fusion_igemm.py",
      "- (d if flat else 0)", "- 0", [IGEMM, "-k", "float64"]),   # the flat loop is the default (session 10)
    M("igemm_row_steps_not_advanced", "ops", "msf_scale/ops/_fusion_igemm.py",
      "rr = r_start + step * BR + tl.arange(0, BR)", "rr = r_start + tl.arange(0, BR)", [IGEMM, "-k", "float64"]),
    M("igemm_tap_diagonal_off_by_one", "ops", "msf_scale/ops/_fusion_igemm.py",
      "sel = (nx[None, :] == x[:, None] + (e + D)) & (x < W)[:, None]",
      "sel = (nx[None, :] == x[:, None] + (e + D + 1)) & (x < W)[:, None]", [IGEMM, "-k", "float64"]),
    M("fft_grid_one_short", "ops", "msf_scale/ops/_fusion_fft.py",
      "    r = max(ks) // 2\n", "    r = max(ks) // 2 - 1\n", [FFT, "-k", "float64"]),
    M("fft_kernel_placed_the_wrong_way", "ops", "msf_scale/ops/_fusion_fft.py",
      "[placed.narrow(dim, r, placed.shape[dim] - r), placed.narrow(dim, 0, r)]",
      "[placed.narrow(dim, placed.shape[dim] - r, r), placed.narrow(dim, 0, placed.shape[dim] - r)]",
      [FFT, "-k", "float64"]),
    M("fft_kernel_spectrum_not_conjugated", "ops", "msf_scale/ops/_fusion_fft.py",
      "torch.fft.rfftn(placed, dim=_DIMS).conj()", "torch.fft.rfftn(placed, dim=_DIMS)", [FFT, "-k", "float64"]),
    M("fft_spectra_cache_ignores_the_kernels", "ops", "msf_scale/models/blocks.py",
      'cached_for_inference(self, "_inference_spectra", own + [self.theta],',
      'cached_for_inference(self, "_inference_spectra", [],',
      ["tests/ops/test_state_fusion.py", "-k", "inference_reuses and fft"]),
    M("scan_triton_reversed_time_off_by_one", "ops", "msf_scale/ops/_scan_triton.py",
      "t = tl.where(rev, L - 1 - j, j)", "t = tl.where(rev, L - j, j)", [SCAN_TRITON, "-k", "matches_ref"]),
    M("scan_triton_state_carried_from_wrong_step", "ops", "msf_scale/ops/_scan_triton.py",
      "== BT - 1, hs, 0.0)", "== BT - 2, hs, 0.0)", [SCAN_TRITON, "-k", "matches_ref"]),
    M("scan_triton_adjoint_carried_from_wrong_step", "ops", "msf_scale/ops/_scan_triton.py",
      "== 0, adj_t, 0.0)", "== 1, adj_t, 0.0)", [SCAN_TRITON, "-k", "matches_ref"]),
    M("scan_triton_decay_gradient_without_b", "ops", "msf_scale/ops/_scan_triton.py",
      "decayed = h - bb", "decayed = h", [SCAN_TRITON, "-k", "matches_ref"]),
    M("scan_triton_partials_ignore_batch", "ops", "msf_scale/ops/_scan_triton.py",
      "slot = b * (DIM // BD) + tl.program_id(1)", "slot = tl.program_id(1)", [SCAN_TRITON, "-k", "matches_ref"]),
    M("anticausal_conv_shifted", "ops", "msf_scale/ops/causal_conv1d.py",
      "xp = F.pad(x, (0, k - 1) if anticausal else (k - 1, 0))",
      "xp = F.pad(x, (1, k - 2) if anticausal else (k - 1, 0))", [SCAN_TRITON, "-k", "bimamba"]),
    M("inference_cache_ignores_in_place_changes", "model", "msf_scale/models/blocks.py",
      "key = (*extra_key, *((id(p), p.data_ptr(), p._version) for p in params))",
      "key = (*extra_key, *((id(p), p.data_ptr()) for p in params))",
      ["tests/ops/test_grouped_scan.py", "-k", "packed", "tests/ops/test_state_fusion.py", "-k", "folded"]),
    M("inference_cache_ignores_dtype", "model", "msf_scale/models/blocks.py",
      "key = (*extra_key, *((id(p), p.data_ptr(), p._version) for p in params))",
      "key = tuple((id(p), p.data_ptr(), p._version) for p in params)",
      ["tests/ops/test_state_fusion.py", "-k", "folded"]),
    M("folded_kernels_folded_twice", "model", "msf_scale/models/blocks.py",
      "kernels, theta = self.folded_kernels(h.dtype), 0.0", "kernels = self.folded_kernels(h.dtype)",
      ["tests/ops/test_state_fusion.py", "-k", "folded"]),
    M("inference_cache_always_on", "model", "msf_scale/models/blocks.py",
      'return (getattr(module, "inference_cache", False) and not torch.is_grad_enabled()',
      "return (not torch.is_grad_enabled()", ["tests/ops/test_grouped_scan.py", "-k", "packed"]),
    # --- session 12: the triton fusion's forward-only op and `auto`'s inference choice ----------------------------
    M("fusion_op_packs_raw_kernels_unfolded", "ops", "msf_scale/models/blocks.py",
      "lambda: pack_kernels(own, self.theta, h.shape[1], h.dtype)",
      "lambda: pack_kernels(own, 0.0, h.shape[1], h.dtype)", [FUSION_TRITON, "-k", "forward_only"]),
    M("fusion_op_logit_groups_skip_channels", "ops", "msf_scale/ops/_fusion_triton.py",
      "    n_cg = g.C // cg\n    partials = ", "    n_cg = max(1, g.C // cg // 2)\n    partials = ",
      [FUSION_TRITON, "-k", "forward_only"]),
    M("fusion_auto_triton_with_gradients", "ops", "msf_scale/ops/state_fusion.py",
      "if k > 3 and not (torch.is_grad_enabled() if grad is None else grad) and _HAS_TRITON:",
      "if k > 3 and _HAS_TRITON:", [FUSION_TRITON, "-k", "auto_picks"]),
    M("conv1d_shifted_form_by_default", "ops", "msf_scale/ops/causal_conv1d.py",
      'COMPILED_INFERENCE_FORM == "shifted" and torch.compiler.is_compiling()', "torch.compiler.is_compiling()",
      ["tests/ops/test_causal_conv1d.py"]),
]


def snapshot(dest: Path, worktree: bool) -> None:
    """HEAD's committed files (default) or the working tree's tracked + untracked-not-ignored files."""
    if worktree:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                               capture_output=True).stdout.decode().split("\0")
        for f in filter(None, files):
            src = REPO / f
            if src.is_file():
                (dest / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / f)
    else:
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def run_tests(copy: Path, selection: list[str], timeout: float) -> tuple[str, float, str]:
    """('pass' | 'fail' | 'timeout', seconds, last lines). A selection is paths and '-k EXPR' pairs, one pytest
    invocation per path (so that each path has its own -k)."""
    groups, cur = [], None
    for a in selection:
        if cur is not None and cur[-1] == "-k":
            cur.append(a)
        elif a == "-k":
            cur.append(a)
        else:
            cur = [a]
            groups.append(cur)
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    t0, tail = time.time(), ""
    for g in groups:
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow and not gpu", *g]
        try:
            p = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "timeout", time.time() - t0, ""
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-3:])
        if p.returncode == 5:
            return "no tests", time.time() - t0, tail
        if p.returncode != 0:
            return "fail", time.time() - t0, tail
    return "pass", time.time() - t0, tail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="mutant names or groups")
    ap.add_argument("--worktree", action="store_true", help="mutate a copy of the working tree, not of HEAD")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per pytest call (a timeout counts as caught)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only or m.group in args.only]
    if args.list or not chosen:
        for m in MUTANTS:
            print(f"{m.group:9s} {m.name:36s} {m.path}")
        return 0 if chosen else 2
    with tempfile.TemporaryDirectory(prefix="msf_mutate_") as tmp:
        copy = Path(tmp)
        snapshot(copy, args.worktree)
        where = subprocess.run([sys.executable, "-c", "import msf_scale; print(msf_scale.__file__)"], cwd=copy,
                               env=dict(os.environ, PYTHONPATH=str(copy)), capture_output=True, text=True).stdout
        if not where.startswith(str(copy)):
            print(f"msf_scale imports from {where.strip()!r}, not from the copy: aborting", file=sys.stderr)
            return 2
        union = []
        for m in chosen:
            if m.tests not in union:
                union.append(m.tests)
        print(f"baseline: {len(union)} test selections on the unmutated copy", flush=True)
        for sel in union:
            status, secs, tail = run_tests(copy, sel, args.timeout)
            if status != "pass":
                print(f"baseline {status} for {' '.join(sel)} ({secs:.0f} s):\n{tail}", file=sys.stderr)
                return 2
        results = []
        t_all = time.time()
        for m in chosen:
            f = copy / m.path
            text = f.read_text()
            if text.count(m.old) != 1:
                status, secs, tail = "stale", 0.0, f"snippet found {text.count(m.old)} times"
            else:
                f.write_text(text.replace(m.old, m.new))
                try:
                    status, secs, tail = run_tests(copy, m.tests, args.timeout)
                finally:
                    f.write_text(text)
                status = {"fail": "caught", "timeout": "caught (timeout)", "pass": "SURVIVED"}.get(status, status)
            results.append({"name": m.name, "group": m.group, "path": m.path, "status": status,
                            "seconds": round(secs, 1), "tests": " ".join(m.tests), "note": m.why})
            print(f"{status:16s} {secs:6.1f} s  {m.group:9s} {m.name}", flush=True)
        caught = sum(r["status"].startswith("caught") for r in results)
        scored = sum(r["status"] in ("SURVIVED",) or r["status"].startswith("caught") for r in results)
        print(f"\nscore: {caught}/{scored} caught ({time.time() - t_all:.0f} s for {len(results)} mutants)")
        for g in dict.fromkeys(r["group"] for r in results):
            rs = [r for r in results if r["group"] == g]
            print(f"  {g:9s} {sum(r['status'].startswith('caught') for r in rs)}/{len(rs)}")
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    return 0 if all(r["status"].startswith("caught") for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
