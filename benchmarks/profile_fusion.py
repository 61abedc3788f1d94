"""Where the time goes (GPU): per-kernel CUDA time of the fused fusion op, or of one model training step (issue 19).

    python benchmarks/profile_fusion.py --out DIR --fusion-backend triton   # MCFM + ASWM, (32, 384, 8, 14, 14) bf16
    python benchmarks/profile_fusion.py --out DIR --model msf_mamba_plus --size small --fusion-backend triton
    python benchmarks/profile_fusion.py --out DIR --model msf_mamba --size tiny --inference graph   # batch-1 latency

torch.profiler over --steps calls after --warmup; kernels grouped by name with their launch count and CUDA time
per call, sorted by time, as a Markdown table (DIR/profile_<what>.md) and JSON; for the fused op also each Triton
kernel's registers, spills and shared memory (what limits occupancy). The fused op is timed forward + backward
(every gradient) of ``multiscale_fusion_triton`` or StateFusion with --fusion-backend; the model as
bench_model.py's step (bf16 autocast, AdamW). With --inference MODE the model's batch-1 eval forward through
msf_scale.inference's runner (eager / graph / compile, ``--freeze`` for Inductor's freezing; bf16, grouped scan and
inference caches as the latency harness runs it), with the wall time per call (CUDA events, outside the profiler)
beside the kernels' summed time: the difference is what the GPU spends idle between kernels. Kernels are also
summed by kind (scan, GEMM, convolution, fusion, normalisation, element-wise, copies).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def kernel_table(prof, steps: int, top: int) -> list[dict]:
    """Device kernels grouped by name: calls per step, ms per step, share of the total (device time only)."""
    rows: dict[str, dict] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        r = rows.setdefault(ev.name, {"kernel": ev.name, "calls": 0, "us": 0.0})
        r["calls"] += 1
        r["us"] += ev.device_time
    total = sum(r["us"] for r in rows.values()) or 1.0
    out = sorted(rows.values(), key=lambda r: -r["us"])
    for r in out:
        r["share"] = round(r["us"] / total, 4)
        r["ms_per_step"] = round(r["us"] / 1e3 / steps, 4)
        r["calls_per_step"] = r["calls"] / steps
        del r["us"]
    return out[:top] + ([{"kernel": f"(total of {len(out)} kernels)", "calls_per_step": sum(
        r["calls_per_step"] for r in out), "ms_per_step": round(total / 1e3 / steps, 4), "share": 1.0}])


KINDS = (  # first match wins: a kernel's name -> what it does. Inductor's kernels name the aten ops they fused
    # (triton_poi_fused_cat_exp_neg_selective_scan_fwd_...): classified by their kind prefix before anything else
    ("elementwise", ("triton_poi_",)),
    ("reduce", ("triton_per_", "triton_red_")),
    ("gemm", ("triton_tem_",)),
    ("scan", ("selective_scan", "scan_fwd", "scan_bwd", "_scan_", "_chunk_ends")),
    ("fusion", ("_row_conv", "_tap_grad", "_aswm", "_combine", "fusion")),
    ("conv", ("conv", "implicit_convolve", "causal_conv1d", "dgrad", "wgrad")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "matmul", "splitk", "mm_")),
    ("norm", ("layer_norm", "layernorm", "rms", "norm")),
    ("copy", ("copy", "cat", "transpose", "permute", "memcpy", "memset", "fill")),
    ("reduce", ("reduce", "softmax", "mean", "sum")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
)


EXACT_KINDS = {   # this project's Triton kernels whose short names would match no key, or a wrong one
    "_fwd": "fusion", "_bwd": "fusion",                       # ops/_fusion_triton.py
    "_chunk_outputs": "scan", "_chunk_prefix": "scan",        # ops/_scan_chunked.py (_chunk_ends matches "scan")
}


def kind_of(kernel: str) -> str:
    if kernel in EXACT_KINDS:
        return EXACT_KINDS[kernel]
    low = kernel.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def kind_table(rows: list[dict]) -> list[dict]:
    """The full kernel table (kernel_table with top=all) summed by kind_of, largest first."""
    kinds: dict[str, dict] = {}
    for r in rows:
        if r["kernel"].startswith("(total"):
            continue
        k = kinds.setdefault(kind_of(r["kernel"]), {"kind": kind_of(r["kernel"]), "calls_per_step": 0.0,
                                                    "ms_per_step": 0.0})
        k["calls_per_step"] += r["calls_per_step"]
        k["ms_per_step"] += r["ms_per_step"]
    return sorted(kinds.values(), key=lambda k: -k["ms_per_step"])


def triton_kernel_info() -> list[dict]:
    """Registers, spills, shared memory and warps of every compiled variant of the fusion kernels (the triton and
    igemm backends' kernels that ran in this process)."""
    info = []
    kernels = [("msf_scale.ops._fusion_triton", ("_fwd", "_combine", "_aswm_dot", "_aswm_grad", "_bwd")),
               ("msf_scale.ops._fusion_igemm", ("_row_conv", "_tap_grad"))]
    for module, names in kernels:
        for name in names:
            info += _compiled_variants(sys.modules.get(module), name)
    return info


def _compiled_variants(module, name: str) -> list[dict]:
    info = []
    if module is not None:
        fn = getattr(module, name, None)
        for caches in getattr(fn, "device_caches", {}).values():
            for k in caches[0].values():
                try:
                    info.append({"kernel": name, "regs": k.n_regs, "spills": k.n_spills,
                                 "shared_bytes": k.metadata.shared, "num_warps": k.metadata.num_warps,
                                 "num_stages": k.metadata.num_stages})
                except Exception as e:   # noqa: BLE001 - Triton's cache layout differs across versions
                    info.append({"kernel": name, "error": repr(e)[:120]})
    return info


def fusion_step(args, dev):
    from msf_scale.models.blocks import StateFusion
    b, c, t, hh, ww = map(int, args.shape.split(","))
    scales = tuple(map(int, args.scales.split(",")))
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    fusion = StateFusion(c, scales, theta=0.7, theta_learnable=True, use_aswm=True, init="uniform", device=dev,
                         dtype=dtype)
    h = torch.randn(b, c, t, hh, ww, device=dev, dtype=dtype, requires_grad=True)
    gout = torch.randn_like(h)
    params = [h, *fusion.kernels, fusion.theta, fusion.aswm.weight, fusion.aswm.bias]

    def step():
        if args.fusion_backend == "triton":
            from msf_scale.ops._fusion_triton import multiscale_fusion_triton   # triton only where asked for
            out = multiscale_fusion_triton(h, list(fusion.kernels), fusion.theta, fusion.aswm.weight,
                                           fusion.aswm.bias)
        else:
            fusion.backend = args.fusion_backend
            out = fusion(h)
        torch.autograd.grad(out, params, gout)
    return step, f"fusion_{args.fusion_backend}_{'_'.join(map(str, scales))}"


def model_step(args, dev):
    from msf_scale.models import create_model
    extra = {"fusion_backend": args.fusion_backend} if args.model != "videomamba" else {}
    model = create_model(args.model, size=args.size, num_classes=32, num_frames=args.frames, img_size=args.img,
                         device=dev, **extra)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(args.batch, 3, args.frames, args.img, args.img, device=dev)
    y = torch.randint(0, 32, (args.batch,), device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, f"{args.model}_{args.size}_b{args.batch}"


def inference_step(args, dev):
    """The batch-1 eval forward as the latency harness runs it (msf_scale.inference.build_runner)."""
    from msf_scale.inference import build_runner
    from msf_scale.models import create_model
    extra = {"fusion_backend": args.fusion_backend} if args.model not in ("videomamba", "cnn3d") else {}
    model = create_model(args.model, size=args.size, num_classes=32, num_frames=args.frames, img_size=args.img,
                         device=dev, scan_backend=args.scan_backend, **extra)
    x = torch.randn(1, 3, args.frames, args.img, args.img, device=dev)
    run = build_runner(model, x, args.inference, torch.bfloat16, freeze=args.freeze)   # None: the harness's default
    tag = f"_{args.inference}" + {None: "", True: "_frozen", False: "_unfrozen"}[args.freeze] + (
        f"_{args.scan_backend}_scan" if args.scan_backend != "auto" else "")
    return (lambda: run(x)), f"{args.model}_{args.size}_batch1{tag}"


def wall_ms(step, calls: int) -> float:
    """Median wall time of one call by CUDA events (outside the profiler, which slows the host)."""
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="32,384,8,14,14", help="fused op: B,C,T,H,W")
    ap.add_argument("--scales", default="3,5,7")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--model", default=None, help="profile a model's training step instead (e.g. msf_mamba_plus)")
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--fusion-backend", default=None,
                    help="the fused op's or the model's fusion backend (default: triton; auto with --inference)")
    ap.add_argument("--inference", default=None, choices=("eager", "graph", "compile"),
                    help="profile --model's batch-1 eval forward through msf_scale.inference in this mode")
    ap.add_argument("--freeze", action=argparse.BooleanOptionalAction, default=None,
                    help="--inference compile with (--freeze) or without (--no-freeze) Inductor's freezing "
                         "(default: as build_runner, frozen on CUDA)")
    ap.add_argument("--scan-backend", default="auto", help="--inference: the model's scan backend (e.g. triton)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)
    if args.inference and not args.model:   # argparse's one line and exit 2, checked before the GPU is looked for
        ap.error("--inference profiles a model: give --model")
    if args.freeze is not None and args.inference != "compile":
        ap.error("--freeze / --no-freeze are for --inference compile (Inductor's freezing)")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    dev = torch.device("cuda")
    if args.inference:
        args.fusion_backend = args.fusion_backend or "auto"   # the latency harness's choice
        step, what = inference_step(args, dev)
    else:
        args.fusion_backend = args.fusion_backend or "triton"
        step, what = model_step(args, dev) if args.model else fusion_step(args, dev)
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    wall = wall_ms(step, max(20, args.steps)) if args.inference else None
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    every = kernel_table(prof, args.steps, 10 ** 6)
    rows = every[:args.top] + every[-1:] if len(every) > args.top + 1 else every
    kinds = kind_table(every)
    info = [] if args.model else triton_kernel_info()
    meta = {"what": what, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": args.steps, "args": vars(args), "wall_ms": wall}
    lines = [f"{what}: CUDA kernels per step ({meta['device']}, {args.steps} steps, torch.profiler)", ""]
    if wall is not None:
        busy = every[-1]["ms_per_step"]
        lines += [f"wall time per call {wall:.3f} ms (median, CUDA events); kernels {busy:.3f} ms "
                  f"({100 * busy / wall:.0f}% of it; the rest: the GPU idle between kernels)", ""]
    lines += ["| kind | calls / step | ms / step |", "|---|---:|---:|"]
    lines += [f"| {k['kind']} | {k['calls_per_step']:g} | {k['ms_per_step']:.3f} |" for k in kinds]
    lines += ["", "| kernel | calls / step | ms / step | share |", "|---|---:|---:|---:|"]
    lines += [f"| {r['kernel'][:90]} | {r['calls_per_step']:g} | {r['ms_per_step']:.3f} | {100 * r['share']:.1f}% |"
              for r in rows]
    if info:
        lines += ["", "| triton kernel | regs | spills | shared bytes | warps | stages |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {i['kernel']} | {i.get('regs')} | {i.get('spills')} | {i.get('shared_bytes')} | "
                  f"{i.get('num_warps')} | {i.get('num_stages')} |" for i in info]
    text = "\n".join(lines)
    print(text, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"profile_{what}.md"), "w") as f:
        f.write(text + "\n")
    doc = {"meta": meta, "kernels": rows, "kinds": kinds, "triton": info}
    with open(os.path.join(args.out, f"profile_{what}.json"), "w") as f:
        json.dump(doc, f, indent=1)
    return doc


if __name__ == "__main__":
    main()
