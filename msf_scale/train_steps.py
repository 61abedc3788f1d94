"""The training loop's parts, each a small object that train.py's loop calls by name: one optimizer step
(`StepWindow`), the log line (`LogWindow`), an evaluation with the best-so-far export (`Evaluator`), a
checkpoint (`Checkpointer`) and the user's callbacks (`Callbacks`)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from msf_scale import distributed as dist
from msf_scale.checkpoint import save_checkpoint
from msf_scale.data.builders import split_identity
from msf_scale.evaluate import evaluate_model
from msf_scale.export import best_top1, export_best
from msf_scale.metrics import mfu, peak_memory_gb
from msf_scale.train_setup import Run, on_main


def batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """Dropout / drop-path randomness as a pure function of the data position, so resume is exact."""
    return (((seed * 1_000_003 + epoch) * 10_000_019 + batch) * 65_537 + rank) % 2**63


class StepWindow:
    """One optimizer step: `grad_accum` micro-batches, each forward/backward under `accumulate`, then clip, step
    and zero. A non-finite loss on any rank skips that micro-batch on every rank; `train.max_bad_steps` in a row
    aborts. `step(batches)` returns whether the optimizer updated (the caller counts the step only then)."""

    def __init__(self, run: Run, meter: LogWindow):
        self.run, self.meter, self.bad_in_row = run, meter, 0
        self.crit = nn.CrossEntropyLoss(label_smoothing=run.cfg.optim.label_smoothing)
        self.deepspeed = dist.uses_deepspeed(run.acc)

    def step(self, batches: Iterator) -> bool:
        run, acc, state, tc = self.run, self.run.acc, self.run.state, self.run.cfg.train
        ok_all = ok = True
        for _ in range(run.accum):
            t0 = time.perf_counter()
            video, label = next(batches)
            self.meter.wait += time.perf_counter() - t0
            video, label = video.to(acc.device, non_blocking=True), label.to(acc.device, non_blocking=True)
            torch.manual_seed(batch_seed(tc.seed, state.epoch, state.batch_in_epoch, acc.process_index))
            with acc.accumulate(run.model):
                logits = run.model(video)
                loss = self.crit(logits.float(), label)
                ok = bool(dist.all_ranks_true(acc, torch.isfinite(loss)).item())  # all ranks agree: skip together
                if ok:
                    acc.backward(loss)
                    self.meter.add(loss, logits, label)
            ok_all &= ok
            state.batch_in_epoch += 1
            state.clips_seen += run.per_batch
            self.meter.micro += 1
        # DeepSpeed steps inside backward() at the window's last micro-batch: it updated iff that one was finite
        updated = ok if self.deepspeed else ok_all
        if updated and not self.deepspeed:
            if run.cfg.optim.clip_grad > 0:
                acc.clip_grad_norm_(run.model.parameters(), run.cfg.optim.clip_grad)
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)  # also drops a skipped window's partial gradients (not DeepSpeed's)
        self._count_bad(ok_all, updated)
        if updated:
            run.scheduler.step()
            if run.ema is not None:
                run.ema.update(acc.unwrap_model(run.model, keep_torch_compile=False))   # plain parameter names
        return updated

    def _count_bad(self, ok_all: bool, updated: bool) -> None:
        state, tc = self.run.state, self.run.cfg.train
        if ok_all:
            self.bad_in_row = 0
            return
        state.bad_steps += 1
        self.bad_in_row += 1
        self.run.acc.print(f"non-finite loss at step {state.step} (epoch {state.epoch}); "
                           f"{'update skipped' if not updated else 'micro-batch dropped'} ({self.bad_in_row} in a row)")
        if self.bad_in_row >= tc.max_bad_steps:
            raise FloatingPointError(
                f"{self.bad_in_row} non-finite losses in a row (train.max_bad_steps={tc.max_bad_steps}) at step "
                f"{state.step}: lower optim.lr, raise schedule.warmup_epochs or use train.precision fp32")


class LogWindow:
    """Training metrics over the steps since the last log line: loss, top-1, clips/s, data wait, memory, MFU.
    Sums stay on the device between log steps (`.item()` is a host sync); `log()` reduces them over ranks."""

    def __init__(self, run: Run):
        from tqdm.auto import tqdm

        self.run = run
        self.sums = torch.zeros(3, device=run.acc.device)  # loss sum, correct, clips
        self.wait, self.micro, self.t0 = 0.0, 0, time.perf_counter()
        self.last: dict[str, Any] = {}
        self.shown: dict[str, str] = {}   # the last evaluation's top-1, on the bar
        self.reported_corrupt = 0
        self.bar = tqdm(total=run.stop_at, initial=run.state.step, dynamic_ncols=True,
                        disable=not (run.acc.is_main_process and run.cfg.log.progress))

    def add(self, loss: torch.Tensor, logits: torch.Tensor, label: torch.Tensor) -> None:
        self.sums += torch.stack([loss.detach() * len(label), (logits.argmax(-1) == label).sum(),
                                  torch.tensor(len(label), device=self.run.acc.device)]).float()

    def show_eval(self, out: dict[str, Any]) -> None:
        """Put an evaluation's top-1 (val, or test without a val split) on the progress bar."""
        self.shown = {k.removesuffix("_top1"): f"{100 * out[k]:.1f}%" for k in ("val_top1", "test_top1") if k in out}
        if self.last:
            self.bar.set_postfix(loss=f"{self.last['loss']:.4f}", lr=f"{self.last['lr']:.2e}", **self.shown)

    def log(self) -> None:
        run, acc, world = self.run, self.run.acc, self.run.acc.num_processes
        loss_sum, correct, n = acc.reduce(self.sums, reduction="sum").tolist()
        dt = time.perf_counter() - self.t0
        cps = self.micro * run.per_batch / dt
        last = {"loss": loss_sum / max(n, 1), "train_top1": correct / max(n, 1),
                "lr": max(run.scheduler.get_last_lr()), "epoch": run.state.epoch, "clips_per_s": cps,
                "clips_per_s_per_device": cps / world, "data_wait_share": self.wait / dt,
                "peak_mem_gb": peak_memory_gb(acc.device), "tflops_per_device": run.train_flops * cps / world / 1e12,
                "mfu": mfu(run.train_flops, cps / world, run.peak_tflops), "bad_steps": run.state.bad_steps}
        last["corrupt_samples"], last["corrupt_shards"] = run.corrupt(run.loader)
        run.logger.log(last, run.state.step)
        bad_data = {"corrupt": last["corrupt_samples"]} if last["corrupt_samples"] else {}
        self.bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", **bad_data, **self.shown,
                             refresh=False)
        if self.bar.disable and last["corrupt_samples"] > self.reported_corrupt:  # no bar: say it in a line
            self.reported_corrupt = last["corrupt_samples"]
            acc.print(f"step {run.state.step}: {self.reported_corrupt} corrupt training samples skipped so far "
                      "(the msf_scale.data warnings name them)")
        self.last = last
        self.sums.zero_()
        self.wait, self.micro, self.t0 = 0.0, 0, time.perf_counter()


class Evaluator:
    """Top-1/top-5 of the model (and of the EMA) on the run's evaluation splits, logged and written to eval.json;
    a new best of `run.select_metric` is exported to best/ (every rank saw the same gathered metric, so all export
    together).

    With a val split every evaluation is on val and best/ is selected on val top-1; the test split is evaluated
    only by the final evaluation (`final=True`, with train.final_test), never chosen on. Without a val split every
    evaluation is on test and best/ is selected on test top-1, as before val splits existed; best/'s record and the
    final metrics say `selected_on: test_top1`."""

    def __init__(self, run: Run):
        self.run, self.metric = run, run.select_metric
        self.best = best_top1(run.run_dir, self.metric) if run.resumed else -1.0  # a fresh run replaces any best/

    def _measure(self, split: str, loader) -> dict[str, Any]:
        run, acc = self.run, self.run.acc
        loader.stats.reset()  # its corrupt count is this evaluation's
        res = evaluate_model(run.model, loader, acc, run.views)  # prepared: autocast comes with it
        out = {f"{split}_top1": res["top1"], f"{split}_top5": res["top5"], f"{split}_samples": res["num_samples"],
               f"{split}_corrupt_samples": run.corrupt(loader)[0]}
        if run.ema is not None:
            e = evaluate_model(run.ema.module, loader, acc, run.views,
                               autocast_bf16=run.cfg.train.precision == "bf16")
            out.update({f"ema_{split}_top1": e["top1"], f"ema_{split}_top5": e["top5"]})
        return out

    def __call__(self, final: bool = False, with_val: bool = True) -> dict[str, Any]:
        run, acc, state = self.run, self.run.acc, self.run.state
        out: dict[str, Any] = {}
        if run.val_loader is not None and with_val:
            out.update(self._measure("val", run.val_loader))
        if run.val_loader is None or (final and run.eval_loader is not None):
            out.update(self._measure("test", run.eval_loader))
        if not out:
            return out
        run.logger.log({**out, "epoch": state.epoch}, state.step)
        if acc.is_main_process:
            (run.run_dir / "eval.json").write_text(json.dumps({"step": state.step, "epoch": state.epoch, **out},
                                                              indent=1))
        if self.metric in out and out[self.metric] > self.best:
            self.best = out[self.metric]
            export_best(acc, run.model, run.run_dir, run.meta, run.ema_module,
                        extra={**run.record, "step": state.step, "epoch": state.epoch, **out,
                               "selected_on": self.metric})
        acc.print(f"step {state.step} epoch {state.epoch}: " + "  ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items())
            + f"  | best/ {self.metric} {self.best:.4f}")
        return out

    def best_record(self, final: dict[str, Any] | None = None) -> dict[str, Any]:
        """What the final metrics say about best/: the metric it was selected on, its value and step, and its test
        top-1. With a val split and train.final_test that is measured here once, on best/'s own weights, and added to
        best/'s record; unless best/ already records it (the final evaluation's export) or holds the weights of
        `final`, the last evaluation (a run stopped right after its best evaluation), whose test figures it takes.
        The main process reads best/'s record and broadcasts it: every rank takes the same path into the
        evaluation's collectives, also where best/ is on a disk only the main process sees."""
        run, acc = self.run, self.run.acc
        conf = run.run_dir / "best" / "model_config.json"
        rec = on_main(acc, lambda: json.loads(conf.read_text()) if conf.is_file() else None)
        if rec is None:
            return {"best_selected_on": self.metric}
        out = {"best_selected_on": self.metric, f"best_{self.metric}": rec.get(self.metric), "best_step": rec["step"]}
        if self.metric == "val_top1" and run.eval_loader is not None:
            if "test_top1" not in rec:
                final = final or {}
                if rec["step"] == run.state.step and "test_top1" in final:   # best/ holds the final weights
                    rec.update({k: final[k] for k in ("test_top1", "test_top5", "test_samples")})
                else:
                    from msf_scale.export import load_model

                    model = load_model(run.run_dir / "best", device=acc.device)
                    run.eval_loader.stats.reset()
                    res = evaluate_model(model, run.eval_loader, acc, run.views,
                                         autocast_bf16=run.cfg.train.precision == "bf16")
                    rec.update(test_top1=res["top1"], test_top5=res["top5"], test_samples=res["num_samples"])
                acc.wait_for_everyone()
                if acc.is_main_process:
                    conf.write_text(json.dumps(rec, indent=1))
                acc.print(f"best/ (step {rec['step']}, val_top1 {rec['val_top1']:.4f}): test_top1 "
                          f"{rec['test_top1']:.4f}  test_top5 {rec['test_top5']:.4f}")
            out.update(best_test_top1=rec["test_top1"], best_test_top5=rec["test_top5"])
        return out


class Checkpointer:
    """`save()` writes a resumable checkpoint of this step, once per step (an epoch end and a ckpt_every step
    may coincide; a resumed run does not re-save the step it resumed from)."""

    def __init__(self, run: Run, callbacks: Callbacks):
        self.run, self.callbacks = run, callbacks
        self.saved_at = run.state.step if run.resumed else -1

    def __call__(self) -> None:
        run, state = self.run, self.run.state
        if self.saved_at == state.step:
            return
        meta = {"model": run.meta, "val_split": split_identity(run.val), "train_state": state.state_dict()}
        path = save_checkpoint(run.acc, run.run_dir, state.step, meta, run.cfg.train.keep_last)
        self.saved_at = state.step
        self.callbacks.checkpointed(path)


class Callbacks:
    """The user's callbacks as one: methods they lack are skipped; a stop request is agreed across ranks."""

    def __init__(self, acc, callbacks: Iterable[Any]):
        self.acc, self.callbacks = acc, list(callbacks)

    def evaluated(self, metrics: dict[str, Any]) -> bool:
        stop = False
        for cb in self.callbacks:
            if hasattr(cb, "on_evaluate"):
                stop |= bool(cb.on_evaluate(dict(metrics)))
        return dist.any_rank(self.acc, stop)

    def checkpointed(self, path: Path) -> None:
        for cb in self.callbacks:
            if hasattr(cb, "on_checkpoint"):
                cb.on_checkpoint(path)
