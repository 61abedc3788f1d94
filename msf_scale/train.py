"""Train an MSF-Mamba video classifier, from one CPU process to many GPUs with DeepSpeed ZeRO.

    accelerate launch msf_scale/train.py --size base [--variant msf_mamba_plus] [--data DIR]
    accelerate launch --config_file cluster/accelerate_1node_zero2.yaml msf_scale/train.py --size base
    python msf_scale/train.py --size tiny --config cpu_demo           # one process: synthetic data, CPU
    python msf_scale/train.py --size tiny --resume auto --optim.lr 3e-4 --train.batch_size 16

Flags: --size --variant --config --data --output-dir --max-steps --epochs --resume auto|PATH, and any
config value as `--section.field value` (msf_scale/config.py, docs/TRAINING.md); `--help` after them lists
every value those presets and flags give.

From code (Ray Tune, a notebook, a test): `train(cfg, callbacks) -> TrainResult` with a `RunConfig`
(`config.load_config(argv)` or built directly) and objects with `on_evaluate` / `on_checkpoint` (`Callback`).
`main(argv)` only parses and calls `train`, returning the final metrics; both raise on bad input. `cli(argv)`, the
command line, prints a user's mistake as one line and exits 2 (tracebacks are for bugs).
Where the pieces live: train_setup.py builds a `Run` (model, loaders, optimizer, prepared, resumed);
train_steps.py holds the loop's parts; the loop itself is `_loop` below. The train loader shards by rank itself,
so it is not passed through `accelerator.prepare`.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

if __package__ in (None, ""):  # `python msf_scale/train.py`: import the package, not its folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from msf_scale import distributed as dist
from msf_scale.checkpoint import TrainState
from msf_scale.config import RunConfig, UserError, help_text, load_config
from msf_scale.export import export_model
from msf_scale.train_setup import Run
from msf_scale.train_steps import Callbacks, Checkpointer, Evaluator, LogWindow, StepWindow


def cli(argv: list[str] | None = None) -> int:
    """The command line: `main`, with a user's mistake printed as one line and exit status 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"msf-scale train: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


class Callback:
    """What `train(cfg, callbacks=[...])` calls; subclass it or pass any object with some of these methods (a
    missing one is skipped). Every process calls them, with the same arguments (metrics are gathered first).

    on_evaluate(metrics) -> bool | None: after every evaluation (periodic, `train.eval_every`, and the final one),
        with the results so far: step, epoch, val_top1/val_top5 when the run has a val split, else
        test_top1/test_top5 (ema_* with EMA), best_val_top1 (best_test_top1 without a val split: what best/ is
        selected on) and the last logged training metrics (loss, train_top1, lr). The final evaluation of a run with
        a val split also carries test_top1/test_top5 (train.final_test). Return True to stop the run after this
        evaluation (a True on any process stops every process); it then saves, exports and returns as usual,
        with `TrainResult.stopped_early`. The final evaluation's return value changes nothing.
    on_checkpoint(path) -> None: after a checkpoint is complete on disk (`path` is its ckpt/step_N directory;
        `--resume PATH` continues from it).
    """

    def on_evaluate(self, metrics: dict[str, Any]) -> bool | None:
        return None

    def on_checkpoint(self, path: Path) -> None:
        return None


@dataclass
class TrainResult:
    metrics: dict[str, Any]      # what final_metrics.json holds: final step, losses, val / test top-1/top-5, best/
    best_top1: float             # the best top-1 of any evaluation on `selected_on` (what best/ holds); -1 if none ran
    run_dir: Path                # config.yaml, metrics.jsonl, ckpt/, model.safetensors, best/
    stopped_early: bool = False  # a callback's on_evaluate returned True
    selected_on: str = "test_top1"   # val_top1 when the run has a val split (test_top1 only without one)


def main(argv: list[str] | None = None) -> dict:
    """The command line's entry: parse, then `train(cfg)`; returns the final metrics."""
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(__doc__.split("Flags:")[0] + help_text(argv))
        raise SystemExit(0)
    return train(load_config(argv)).metrics


def train(cfg: RunConfig, callbacks: Iterable[Any] = ()) -> TrainResult:
    """One training run of `cfg` in this process (one of many under `accelerate launch`): set up, loop, export."""
    dist.reset_state()
    run = Run.build(cfg, dist.build_accelerator(cfg))
    result = _loop(run, Callbacks(run.acc, callbacks))
    acc = run.acc
    del run   # the model, engine, optimizer and loaders: `shutdown` frees them before the process groups
    dist.shutdown(acc)
    dist.reset_state()
    return result


def _loop(run: Run, callbacks: Callbacks) -> TrainResult:
    """Epochs of optimizer steps; a log line every log.log_every steps, a checkpoint every train.ckpt_every steps
    and at each epoch's end, an evaluation every train.eval_every epochs, then the final evaluation and export."""
    cfg, state = run.cfg, run.state
    meter, evaluate, save = LogWindow(run), Evaluator(run), Checkpointer(run, callbacks)
    window = StepWindow(run, meter)
    stopped, last_eval = False, None
    epoch_batches = run.steps_per_epoch * run.accum
    run.model.train()
    while not stopped and state.epoch < cfg.schedule.epochs and state.step < run.stop_at:
        if state.batch_in_epoch < epoch_batches:   # skipped (bad) steps shorten an epoch
            run.loader.set_epoch(state.epoch, start_batch=state.batch_in_epoch)
            batches = iter(run.loader)
        while state.batch_in_epoch < epoch_batches and state.step < run.stop_at:
            if not window.step(batches):
                continue
            state.step += 1
            meter.bar.update(1)
            if state.step % cfg.log.log_every == 0 or state.step in (1, run.stop_at):
                meter.log()
            if cfg.train.ckpt_every and state.step % cfg.train.ckpt_every == 0:
                save()
        if state.batch_in_epoch >= epoch_batches:   # epoch done
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            save()
            if cfg.train.eval_every and state.epoch % cfg.train.eval_every == 0 and state.step < run.stop_at:
                last_eval = evaluate()
                meter.show_eval(last_eval)
                stopped = callbacks.evaluated(_report(last_eval, evaluate, meter, state))
    meter.bar.close()
    save()
    if not stopped:
        last_eval = evaluate(final=True)
        callbacks.evaluated(_report(last_eval, evaluate, meter, state))
    elif run.val_loader is not None and run.eval_loader is not None:   # the test, once, also after a stop
        last_eval = {**last_eval, **evaluate(final=True, with_val=False)}
    return _finish(run, meter.last, last_eval, evaluate, stopped)


def _finish(run: Run, last_log: dict, last_eval: dict, evaluate: Evaluator, stopped: bool) -> TrainResult:
    """The final metrics (final_metrics.json), best/'s test figure (a run with a val split) and the export."""
    acc, state = run.acc, run.state
    train_corrupt = run.corrupt(run.loader)
    best = evaluate.best_record(last_eval)
    final = {"step": state.step, "epoch": state.epoch, "clips_seen": state.clips_seen, "bad_steps": state.bad_steps,
             **{k: last_log[k] for k in ("loss", "train_top1", "clips_per_s", "mfu") if k in last_log},
             **last_eval, **best, "corrupt_samples": train_corrupt[0], "corrupt_shards": train_corrupt[1],
             "wall_s": round(time.time() - run.t_start, 1), "run_dir": str(run.run_dir)}
    export_model(acc, run.model, run.run_dir, run.meta, run.ema_module, extra=run.record)
    if acc.is_main_process:
        (run.run_dir / "final_metrics.json").write_text(json.dumps(final, indent=1))
    bad_eval = [f" and {final[f'{s}_corrupt_samples']} corrupt {s} samples" for s in ("val", "test")
                if final.get(f"{s}_corrupt_samples")]
    if final["corrupt_samples"] or bad_eval:
        acc.print(f"skipped {final['corrupt_samples']} corrupt training samples ({final['corrupt_shards']} shard "
                  f"reads){''.join(bad_eval)}: see final_metrics.json")
    run.logger.close()
    return TrainResult(final, evaluate.best, run.run_dir, stopped, evaluate.metric)


def _report(out: dict, evaluate: Evaluator, meter: LogWindow, state: TrainState) -> dict[str, Any]:
    """What `Callback.on_evaluate` sees: this evaluation, the best so far and the last training log."""
    train_part = {k: meter.last[k] for k in ("loss", "train_top1", "lr") if k in meter.last}
    return {"step": state.step, "epoch": state.epoch, **train_part, **out, f"best_{evaluate.metric}": evaluate.best}


if __name__ == "__main__":
    raise SystemExit(dist.run_rank(cli))
