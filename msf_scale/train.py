"""Train an MSF-Mamba video classifier, from one CPU process to many GPUs with DeepSpeed ZeRO.

    accelerate launch msf_scale/train.py --size base [--variant msf_mamba_plus] [--data DIR]
    accelerate launch --config_file cluster/accelerate_1node_zero2.yaml msf_scale/train.py --size base
    python msf_scale/train.py --size tiny --config cpu_demo           # one process: synthetic data, CPU
    python msf_scale/train.py --size tiny --resume auto --optim.lr 3e-4 --train.batch_size 16

Flags: --size --variant --config --data --output-dir --max-steps --epochs --resume auto|PATH, and any
config value as `--section.field value` (msf_scale/config.py, docs/TRAINING.md); `--help` after them lists
every value those presets and flags give. `main(argv)` returns the final metrics and raises on bad input;
`cli(argv)`, the command line, prints a user's mistake as one line and exits 2 (tracebacks are for bugs).
The train loader shards by rank itself, so it is not passed through `accelerator.prepare`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python msf_scale/train.py`: import the package, not its folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from torch import nn

from msf_scale import distributed as dist
from msf_scale.checkpoint import (TrainState, best_top1, check_resume_compatible, data_record, export_best,
                                  export_model, model_meta, recover_best, resolve_resume, save_checkpoint)
from msf_scale.config import ConfigError, RunConfig, UserError, help_text, load_config, save_config
from msf_scale.ema import ModelEma
from msf_scale.evaluate import build_loader, data_root, evaluate_model
from msf_scale.metrics import (MetricLogger, available_memory_gb, device_peak_tflops, estimate_train_memory_gb,
                               flat_config, mfu, peak_memory_gb, train_flops_per_clip, truncate_jsonl)
from msf_scale.models import create_model
from msf_scale.optim import build_optimizer, build_scheduler


def batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """Dropout / drop-path randomness as a pure function of the data position, so resume is exact."""
    return (((seed * 1_000_003 + epoch) * 10_000_019 + batch) * 65_537 + rank) % 2**63


def cli(argv: list[str] | None = None) -> int:
    """The command line: `main`, with a user's mistake printed as one line and exit status 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"msf-scale train: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


def preflight_memory(cfg: RunConfig, model_cfg, device: torch.device, processes: int) -> None:
    """On CPU, refuse (or warn about) a run whose estimated memory exceeds the free RAM: the kernel's OOM killer
    would end it with SIGKILL and no message. The GPU recipe (224 px, batch 32) needs tens of GB per process."""
    if device.type != "cpu" or not hasattr(model_cfg, "grid"):
        return
    tc, m = cfg.train, cfg.model
    need = estimate_train_memory_gb(model_cfg, tc.batch_size, processes, tc.precision, m.grad_checkpointing)
    free = available_memory_gb()
    if free is None or need <= 0.7 * free:
        return
    fit = max(1, int(tc.batch_size * 0.7 * free / need))
    t, gh, gw = model_cfg.grid
    msg = (f"estimated training memory {need:.1f} GB ({processes} process(es) x batch {tc.batch_size} x "
           f"{t * gh * gw} tokens: {m.num_frames} x {m.img_size} x {m.img_size} px, patch {model_cfg.patch_size}) "
           f"{'exceeds' if need > free else 'is close to'} the {free:.1f} GB free: lower --train.batch_size "
           f"(~{fit} fits), --model.img_size or the process count, or pass --model.grad_checkpointing true")
    if need > free and tc.mem_check:
        raise ConfigError(msg + "; --train.mem_check false runs it anyway")
    print(f"[msf_scale] warning: {msg}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__.split("Flags:")[0] + help_text(argv))
        raise SystemExit(0)
    cfg = load_config(argv)
    dist.reset_state()
    accelerator = dist.build_accelerator(cfg)
    result = _train(cfg, accelerator)
    accelerator.wait_for_everyone()  # no rank tears down its process group while a peer still talks to it
    accelerator.end_training()
    dist.reset_state()
    return result


def _train(cfg: RunConfig, acc) -> dict:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from msf_scale.data import build_train_loader, read_dataset_info

    t_start, run_dir, is_main = time.time(), cfg.run_dir(), acc.is_main_process
    set_seed(cfg.train.seed)
    with acc.main_process_first():
        root = data_root(cfg.data.root, cfg.data.synth)
    info = read_dataset_info(root)
    m, tc, world, rank = cfg.model, cfg.train, acc.num_processes, acc.process_index
    model = create_model(m.variant, size=m.size, num_classes=info.num_classes, num_frames=m.num_frames,
                         img_size=m.img_size, drop_path_rate=m.drop_path_rate, **m.arch)
    model.set_grad_checkpointing(m.grad_checkpointing)
    preflight_memory(cfg, model.cfg, acc.device, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    meta = model_meta(model, m.variant, m.size)
    resume = resolve_resume(tc.resume, run_dir)
    if resume is not None:
        check_resume_compatible(resume, meta)
    elif m.init:  # released / exported weights; a resumed run has its own
        from msf_scale.weights_import import load_init
        report = load_init(model, m.init)
        acc.print(report.summary(m.init))
    record = data_record(cfg, info, root)
    accum = acc.gradient_accumulation_steps
    global_batch, per_batch = tc.batch_size * world * accum, tc.batch_size * world
    loader = build_train_loader(root, batch_size=tc.batch_size, num_frames=m.num_frames, img_size=m.img_size,
                                num_workers=cfg.data.num_workers, rank=rank, world_size=world, seed=tc.seed,
                                epoch_samples=cfg.data.epoch_samples, flip=cfg.data.flip,
                                min_scale=cfg.data.min_scale)
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise ConfigError(f"an epoch has {len(loader)} batches per rank, fewer than train.grad_accum={accum}; "
                         "lower train.batch_size / train.grad_accum or raise data.epoch_samples")
    total = cfg.schedule.epochs * steps_per_epoch
    stop_at = total if tc.max_steps is None else min(total, tc.max_steps)
    optimizer = build_optimizer(model, cfg, global_batch)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch, global_batch)
    fwd_macs = model.flops_per_clip()
    ema = ModelEma(model, tc.ema_decay, acc.device, dist.zero_stage(acc)) if tc.ema else None  # fp32 copy, pre-prepare
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    state = TrainState()
    acc.register_for_checkpointing(state)
    if ema is not None:
        acc.register_for_checkpointing(ema)
    if resume is not None:
        acc.load_state(str(resume))
        if state.clips_per_batch and state.clips_per_batch != per_batch:  # batch or world size changed
            state.batch_in_epoch = state.batch_in_epoch * state.clips_per_batch // per_batch
        acc.print(f"resumed from {resume} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    state.clips_per_batch = per_batch
    if resume is not None and is_main:
        recover_best(run_dir)
    acc.wait_for_everyone()
    best = [best_top1(run_dir) if resume is not None else -1.0]  # a fresh run replaces any best/ it finds
    run_info = {"engine": dist.engine_name(model), "zero_stage": dist.zero_stage(acc), "world_size": world,
                "batch_size": tc.batch_size, "grad_accum": accum, "global_batch": global_batch,
                "steps_per_epoch": steps_per_epoch, "total_steps": total, "stop_at": stop_at,
                "precision": tc.precision, "device": str(acc.device), "data": root, "num_classes": info.num_classes,
                "forward_macs_per_clip": fwd_macs, "resumed_from": str(resume) if resume else None}
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "run_meta.json").write_text(json.dumps(run_info, indent=1))
        truncate_jsonl(run_dir / "metrics.jsonl", state.step)
    if acc.log_with:
        acc.init_trackers("msf_scale", config=flat_config(cfg.to_dict()),
                          init_kwargs={"wandb": {"name": run_dir.name}, "mlflow": {"run_name": run_dir.name}})
    acc.print(f"{m.variant}_{m.size}: global batch {global_batch} = {tc.batch_size}/device x {world} devices x "
              f"{accum} accumulation; {steps_per_epoch} steps/epoch, {stop_at} steps; engine {run_info['engine']}")
    logger = MetricLogger(run_dir, is_main, acc)
    eval_loader = build_loader(root, "test", cfg.data.eval_batch_size or tc.batch_size, m.num_frames, m.img_size,
                               cfg.data.num_workers, rank, world, cfg.data.num_clips, cfg.data.num_crops)
    views = (cfg.data.num_clips * cfg.data.num_crops, 3, m.num_frames, m.img_size, m.img_size)
    ds = dist.uses_deepspeed(acc)
    peak = device_peak_tflops(cfg.log.peak_tflops, acc.device)
    flops = train_flops_per_clip(fwd_macs)

    def corrupt(ld) -> list[int]:
        """Corrupt samples and shard reads skipped so far, summed over ranks (collective)."""
        counts = torch.tensor([ld.stats.corrupt, ld.stats.corrupt_shards], device=acc.device)
        return [int(c) for c in (acc.reduce(counts, reduction="sum") if world > 1 else counts).tolist()]

    def evaluate() -> dict:
        eval_loader.stats.reset()  # its corrupt count is this evaluation's
        res = evaluate_model(model, eval_loader, acc, views)  # prepared: autocast comes with it
        out = {"test_top1": res["top1"], "test_top5": res["top5"], "test_samples": res["num_samples"],
               "test_corrupt_samples": corrupt(eval_loader)[0]}
        if ema is not None:
            e = evaluate_model(ema.module, eval_loader, acc, views, autocast_bf16=tc.precision == "bf16")
            out.update(ema_test_top1=e["top1"], ema_test_top5=e["top5"])
        logger.log({**out, "epoch": state.epoch}, state.step)
        if is_main:
            (run_dir / "eval.json").write_text(json.dumps({"step": state.step, "epoch": state.epoch, **out}, indent=1))
        if out["test_top1"] > best[0]:  # every rank saw the same gathered metric: all export together
            best[0] = out["test_top1"]
            export_best(acc, model, run_dir, meta, ema.module if ema else None,
                        extra={**record, "step": state.step, "epoch": state.epoch, **out})
        acc.print(f"step {state.step} epoch {state.epoch}: " + "  ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()))
        return out

    def checkpoint() -> None:
        if saved_at[0] != state.step:
            save_checkpoint(acc, run_dir, state.step, {"model": meta, "train_state": state.state_dict()}, tc.keep_last)
            saved_at[0] = state.step

    saved_at = [state.step if resume is not None else -1]
    crit = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    sums = torch.zeros(3, device=acc.device)  # loss sum, correct, clips over the log window (no host sync)
    bar = tqdm(total=stop_at, initial=state.step, disable=not (is_main and cfg.log.progress), dynamic_ncols=True)
    bad_in_row, wait, t_win, micro_win, last, reported_corrupt = 0, 0.0, time.perf_counter(), 0, {}, 0
    model.train()
    epoch_batches = steps_per_epoch * accum
    while state.epoch < cfg.schedule.epochs and state.step < stop_at:  # skipped (bad) steps shorten an epoch
        if state.batch_in_epoch < epoch_batches:
            loader.set_epoch(state.epoch, start_batch=state.batch_in_epoch)
            it = iter(loader)
        while state.batch_in_epoch < epoch_batches and state.step < stop_at:
            ok_all = ok = True
            for _ in range(accum):
                t0 = time.perf_counter()
                video, label = next(it)
                wait += time.perf_counter() - t0
                video, label = video.to(acc.device, non_blocking=True), label.to(acc.device, non_blocking=True)
                torch.manual_seed(batch_seed(tc.seed, state.epoch, state.batch_in_epoch, rank))
                with acc.accumulate(model):
                    logits = model(video)
                    loss = crit(logits.float(), label)
                    ok = bool(dist.all_ranks_true(acc, torch.isfinite(loss)).item())  # all ranks agree: skip together
                    if ok:
                        acc.backward(loss)
                        sums += torch.stack([loss.detach() * len(label), (logits.argmax(-1) == label).sum(),
                                             torch.tensor(len(label), device=acc.device)]).float()
                ok_all &= ok
                state.batch_in_epoch += 1
                state.clips_seen += per_batch
                micro_win += 1
            # DeepSpeed steps inside backward() at the window's last micro-batch: it updated iff that one was finite
            updated = ok if ds else ok_all
            if updated and not ds:
                if cfg.optim.clip_grad > 0:
                    acc.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # also drops a skipped window's partial gradients (not DeepSpeed's)
            if not ok_all:
                state.bad_steps += 1
                bad_in_row += 1
                acc.print(f"non-finite loss at step {state.step} (epoch {state.epoch}); "
                          f"{'update skipped' if not updated else 'micro-batch dropped'} ({bad_in_row} in a row)")
                if bad_in_row >= tc.max_bad_steps:
                    raise FloatingPointError(
                        f"{bad_in_row} non-finite losses in a row (train.max_bad_steps={tc.max_bad_steps}) at step "
                        f"{state.step}: lower optim.lr, raise schedule.warmup_epochs or use train.precision fp32")
            else:
                bad_in_row = 0
            if not updated:
                continue
            scheduler.step()
            if ema is not None:
                ema.update(acc.unwrap_model(model))
            state.step += 1
            bar.update(1)
            if state.step % cfg.log.log_every == 0 or state.step in (1, stop_at):
                loss_sum, correct, n = acc.reduce(sums, reduction="sum").tolist()
                dt = time.perf_counter() - t_win
                cps = micro_win * per_batch / dt
                last = {"loss": loss_sum / max(n, 1), "train_top1": correct / max(n, 1),
                        "lr": max(scheduler.get_last_lr()), "epoch": state.epoch, "clips_per_s": cps,
                        "clips_per_s_per_device": cps / world, "data_wait_share": wait / dt,
                        "peak_mem_gb": peak_memory_gb(acc.device), "tflops_per_device": flops * cps / world / 1e12,
                        "mfu": mfu(flops, cps / world, peak), "bad_steps": state.bad_steps}
                last["corrupt_samples"], last["corrupt_shards"] = corrupt(loader)
                logger.log(last, state.step)
                bad_data = {"corrupt": last["corrupt_samples"]} if last["corrupt_samples"] else {}
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", **bad_data, refresh=False)
                if bar.disable and last["corrupt_samples"] > reported_corrupt:  # no bar: say it in a line
                    reported_corrupt = last["corrupt_samples"]
                    acc.print(f"step {state.step}: {reported_corrupt} corrupt training samples skipped so far "
                              "(the msf_scale.data warnings name them)")
                sums.zero_()
                wait, t_win, micro_win = 0.0, time.perf_counter(), 0
            if tc.ckpt_every and state.step % tc.ckpt_every == 0:
                checkpoint()
        if state.batch_in_epoch >= epoch_batches:  # epoch done
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            checkpoint()
            if tc.eval_every and state.epoch % tc.eval_every == 0 and state.step < stop_at:
                evaluate()
    bar.close()
    checkpoint()
    train_corrupt = corrupt(loader)
    final = {"step": state.step, "epoch": state.epoch, "clips_seen": state.clips_seen, "bad_steps": state.bad_steps,
             **{k: last[k] for k in ("loss", "train_top1", "clips_per_s", "mfu") if k in last}, **evaluate(),
             "corrupt_samples": train_corrupt[0], "corrupt_shards": train_corrupt[1],
             "wall_s": round(time.time() - t_start, 1), "run_dir": str(run_dir)}
    export_model(acc, model, run_dir, meta, ema.module if ema else None, extra=record)
    if is_main:
        (run_dir / "final_metrics.json").write_text(json.dumps(final, indent=1))
    if final["corrupt_samples"] or final["test_corrupt_samples"]:
        acc.print(f"skipped {final['corrupt_samples']} corrupt training samples ({final['corrupt_shards']} shard "
                  f"reads) and {final['test_corrupt_samples']} corrupt test samples: see final_metrics.json")
    logger.close()
    return final


if __name__ == "__main__":
    raise SystemExit(cli())
