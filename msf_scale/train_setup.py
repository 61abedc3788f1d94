"""A training run's set-up: from a config and an Accelerator to everything the loop needs (`Run.build`).

Order matters and is kept: the seed, the data (generated once, main process first), the model (its init draws
from the seeded generator), resume or released weights, the train loader, optimizer and schedule, the EMA copy
(before `prepare`), `prepare`, the checkpointed loop position, the run directory, the loggers, the val and test
loaders. The val split (the dataset's own, or `data.val_fraction`'s carve-out of training subjects) is decided
with the data (by the main process, broadcast to the others), before the train loader, which leaves a carved
split's clips out; it draws on no global generator, so a run without one trains exactly as before.
The CPU memory pre-flight lives here too: it refuses a run before the kernel's OOM killer would end it.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from msf_scale import distributed as dist
from msf_scale.checkpoint import TrainState, check_resume_compatible, resolve_resume
from msf_scale.config import ConfigError, RunConfig, save_config
from msf_scale.data.builders import (ValSplit, dataset_root, describe_identity, eval_loader, split_identity,
                                     train_loader, val_loader, val_split)
from msf_scale.ema import ModelEma
from msf_scale.export import data_record, model_meta, recover_best
from msf_scale.metrics import (MetricLogger, available_memory_gb, device_peak_tflops, estimate_train_memory_gb,
                               flat_config, train_flops_per_clip, truncate_jsonl)
from msf_scale.models import ModelOptionError, build_model
from msf_scale.optim import build_optimizer, build_scheduler


@dataclass
class Run:
    """Everything a run holds, built once by `Run.build`: the prepared model, optimizer and schedule, the
    loaders, the loop position (`state`, checkpointed) and where results go."""
    cfg: RunConfig
    acc: Any                     # accelerate.Accelerator
    model: nn.Module             # prepared (DDP / DeepSpeed engine / bare module)
    optimizer: Any
    scheduler: Any
    ema: ModelEma | None
    state: TrainState
    loader: Any                  # the training stream (not prepared: it shards by rank itself)
    eval_loader: Any             # the test split; None when a run with a val split skips its test (train.final_test)
    val_loader: Any              # the val split; None without one
    val: ValSplit | None         # where the val split comes from
    meta: dict[str, Any]         # the model's description (export.model_meta)
    record: dict[str, Any]       # the data and preprocessing an export records
    run_dir: Path
    resumed: bool
    accum: int
    per_batch: int               # clips per micro-batch over all ranks
    steps_per_epoch: int
    stop_at: int
    views: tuple[int, ...]       # one test video's input shape (V, 3, T, S, S)
    train_flops: int             # training FLOPs per clip
    peak_tflops: float | None
    logger: MetricLogger         # metrics.jsonl and the trackers
    t_start: float = field(default_factory=time.time)

    @property
    def select_metric(self) -> str:
        """What best/ is selected on: val top-1 when the run has a val split, else test top-1 (and then says so)."""
        return "val_top1" if self.val is not None else "test_top1"

    @property
    def ema_module(self) -> nn.Module | None:
        return self.ema.module if self.ema is not None else None

    def corrupt(self, loader) -> list[int]:
        """Corrupt samples and shard reads skipped so far, summed over ranks (collective)."""
        counts = torch.tensor([loader.stats.corrupt, loader.stats.corrupt_shards], device=self.acc.device)
        summed = self.acc.reduce(counts, reduction="sum") if self.acc.num_processes > 1 else counts
        return [int(c) for c in summed.tolist()]

    @classmethod
    def build(cls, cfg: RunConfig, acc) -> Run:
        from accelerate.utils import set_seed

        from msf_scale.data import read_dataset_info

        t_start, run_dir, m, tc = time.time(), cfg.run_dir(), cfg.model, cfg.train
        world, rank = acc.num_processes, acc.process_index
        set_seed(tc.seed)
        with acc.main_process_first():
            root = dataset_root(cfg.data)
        info = read_dataset_info(root)
        val = on_main(acc, lambda: val_split(cfg.data, root))   # reads every training shard's metadata once
        try:
            model = build_model(cfg.model, info.num_classes)
        except ModelOptionError as err:   # a model option's value (--model.arch.*): the user's flag
            raise ConfigError(f"model: {err}") from None
        preflight_memory(cfg, model.cfg, acc.device, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        meta = model_meta(model, m.variant, m.size)
        resume = resolve_resume(tc.resume, run_dir)
        if resume is not None:
            check_resume_compatible(resume, meta, split_identity(val), describe_identity)
        elif m.init:  # released / exported weights; a resumed run has its own
            from msf_scale.weights_import import load_init
            acc.print(load_init(model, m.init).summary(m.init))
        accum = acc.gradient_accumulation_steps
        global_batch, per_batch = tc.batch_size * world * accum, tc.batch_size * world
        clip = {"num_frames": m.num_frames, "img_size": m.img_size, "batch_size": tc.batch_size, "rank": rank,
                "world_size": world}
        loader = train_loader(cfg.data, root, seed=tc.seed, val=val, **clip)
        steps_per_epoch = len(loader) // accum
        if steps_per_epoch == 0:
            raise ConfigError(f"an epoch has {len(loader)} batches per rank, fewer than train.grad_accum={accum}; "
                              "lower train.batch_size / train.grad_accum or raise data.epoch_samples")
        total = cfg.schedule.epochs * steps_per_epoch
        stop_at = total if tc.max_steps is None else min(total, tc.max_steps)
        optimizer = build_optimizer(model, cfg, global_batch)
        scheduler = build_scheduler(optimizer, cfg, steps_per_epoch, global_batch)
        fwd_macs = model.flops_per_clip()
        ema = ModelEma(model, tc.ema_decay, acc.device, dist.zero_stage(acc)) if tc.ema else None  # pre-prepare
        model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        state = _restore(acc, ema, resume, per_batch)
        if resume is not None and acc.is_main_process:
            recover_best(run_dir)
        acc.wait_for_everyone()
        run_info = {"engine": dist.engine_name(model), "compiled": dist.compiled_form(model),
                    "zero_stage": dist.zero_stage(acc), "world_size": world,
                    "batch_size": tc.batch_size, "grad_accum": accum, "global_batch": global_batch,
                    "steps_per_epoch": steps_per_epoch, "total_steps": total, "stop_at": stop_at,
                    "precision": tc.precision, "device": str(acc.device), "data": root,
                    "num_classes": info.num_classes, "forward_macs_per_clip": fwd_macs,
                    "resumed_from": str(resume) if resume else None,
                    "val": val.to_json() if val is not None else None,
                    "best_selected_on": "val_top1" if val is not None else "test_top1"}
        _start_run_dir(cfg, acc, run_dir, run_info, state.step)
        acc.print(f"{m.variant}_{m.size}: global batch {global_batch} = {tc.batch_size}/device x {world} devices x "
                  f"{accum} accumulation; {steps_per_epoch} steps/epoch, {stop_at} steps; engine {run_info['engine']}, "
                  f"compiled: {run_info['compiled']}")
        acc.print(_val_line(val, tc.final_test))
        logger = MetricLogger(run_dir, acc.is_main_process, acc)
        views = (cfg.data.num_clips * cfg.data.num_crops, 3, m.num_frames, m.img_size, m.img_size)
        test = eval_loader(cfg.data, root, **clip) if val is None or tc.final_test else None
        vals = val_loader(cfg.data, root, val, **clip) if val is not None else None
        return cls(cfg=cfg, acc=acc, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, state=state,
                   loader=loader, eval_loader=test, val_loader=vals, val=val, meta=meta,
                   record=data_record(cfg, info, root), run_dir=run_dir, resumed=resume is not None, accum=accum,
                   per_batch=per_batch, steps_per_epoch=steps_per_epoch, stop_at=stop_at, views=views,
                   train_flops=train_flops_per_clip(fwd_macs),
                   peak_tflops=device_peak_tflops(cfg.log.peak_tflops, acc.device), logger=logger, t_start=t_start)



def on_main(acc, fn: Callable[[], Any]) -> Any:
    """`fn()` computed by the main process alone and broadcast: every rank gets its value, or raises its error. For
    a decision that reads files (which another node may not see, or see in another state) and then leads every rank
    into collectives: taken once, so that no rank takes another path and hangs the others."""
    if acc.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    if acc.is_main_process:
        try:
            box = [("value", fn())]
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            box = [("error", e)]
    broadcast_object_list(box, from_process=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def _val_line(val: ValSplit | None, final_test: bool) -> str:
    """The run's one line on what it evaluates and what best/ is selected on."""
    if val is None:
        return ("no val split: every evaluation is on test and best/ is the evaluation with the best test top-1 "
                "(a selection on test: its figure is optimistic; --data.val_fraction F carves a val split of whole "
                "training subjects)")
    line = (f"val split: {val.describe()}; evaluations and best/ on val top-1; test "
            + ("once at the end (final and best/ weights)" if final_test else "never (train.final_test false)"))
    if val.shared:
        line += "; warning (data.allow_val_overlap): the dataset's val split shares subjects with " + ", ".join(
            f"{k} ({', '.join(v[:5])}{'...' if len(v) > 5 else ''})" for k, v in val.shared.items())
    return line


def _restore(acc, ema: ModelEma | None, resume: Path | None, per_batch: int) -> TrainState:
    """The loop position, registered for checkpointing (with the EMA) and loaded from `resume` if given."""
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
    return state


def _start_run_dir(cfg: RunConfig, acc, run_dir: Path, run_info: dict, step: int) -> None:
    """The resolved config, the run's facts, a metrics log cut back to `step` (a resume), and the trackers."""
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        (run_dir / "run_meta.json").write_text(json.dumps(run_info, indent=1))
        truncate_jsonl(run_dir / "metrics.jsonl", step)
    if acc.log_with:
        acc.init_trackers("msf_scale", config=flat_config(cfg.to_dict()),
                          init_kwargs={"wandb": {"name": run_dir.name}, "mlflow": {"run_name": run_dir.name}})



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
