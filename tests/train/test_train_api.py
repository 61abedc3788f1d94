"""`train(cfg, callbacks)` called directly, as Ray Tune and notebooks do: the result object, the callback
protocol (what on_evaluate sees, early stop, on_checkpoint paths) and that it trains exactly as `main(argv)`."""
from __future__ import annotations

import json

from msf_scale.checkpoint import list_checkpoints
from msf_scale.config import load_config
from msf_scale.metrics import read_jsonl
from msf_scale.train import Callback, TrainResult, main, train


class Recorder(Callback):
    def __init__(self, stop_at_epoch: int | None = None):
        self.evals, self.ckpts, self.stop_at_epoch = [], [], stop_at_epoch

    def on_evaluate(self, metrics):
        self.evals.append(metrics)
        return self.stop_at_epoch is not None and metrics["epoch"] >= self.stop_at_epoch

    def on_checkpoint(self, path):
        assert (path / "COMPLETE").is_file(), "on_checkpoint before the checkpoint was complete"
        self.ckpts.append(path.name)


class OnlyEvaluate:   # a plain object with one of the methods: the other is skipped
    def __init__(self):
        self.steps = []

    def on_evaluate(self, metrics):
        self.steps.append(metrics["step"])


def test_train_returns_a_result_and_calls_back(tiny_argv, tmp_path):
    rec, plain = Recorder(), OnlyEvaluate()
    result = train(load_config(tiny_argv("--epochs", "3", "--schedule.warmup_epochs", "1",
                                         "--train.eval_every", "1")), callbacks=[rec, plain])
    assert isinstance(result, TrainResult) and not result.stopped_early
    assert result.run_dir == tmp_path / "run"
    assert result.metrics == json.loads((result.run_dir / "final_metrics.json").read_text())
    assert result.metrics["step"] == 12 and result.metrics["epoch"] == 3
    # epochs 1 and 2 (epoch 3's evaluation is the final one, not repeated), then the final evaluation
    assert [(m["epoch"], m["step"]) for m in rec.evals] == [(1, 4), (2, 8), (3, 12)]
    assert plain.steps == [4, 8, 12]
    assert {"loss", "train_top1", "lr", "test_top1", "test_top5", "best_test_top1"} <= set(rec.evals[0])
    assert result.best_top1 == max(m["test_top1"] for m in rec.evals) == rec.evals[-1]["best_test_top1"]
    best = json.loads((result.run_dir / "best" / "model_config.json").read_text())
    assert best["test_top1"] == result.best_top1
    assert rec.ckpts == ["step_0000004", "step_0000008", "step_0000012"]   # each epoch end, the final one once


def test_a_callback_stops_the_run_early(tiny_argv):
    rec = Recorder(stop_at_epoch=1)
    result = train(load_config(tiny_argv("--epochs", "4", "--schedule.warmup_epochs", "1",
                                         "--train.eval_every", "1")), callbacks=[rec])
    assert result.stopped_early and result.metrics["step"] == 4 and result.metrics["epoch"] == 1
    assert [m["step"] for m in rec.evals] == [4]                     # no second, final evaluation of step 4
    assert result.metrics["test_top1"] == rec.evals[0]["test_top1"]
    assert (result.run_dir / "model.safetensors").is_file()          # still exported
    assert [p.name for p in list_checkpoints(result.run_dir)] == ["step_0000004"]


def test_train_and_main_train_the_same(tiny_argv):
    argv = ["--epochs", "2", "--schedule.warmup_epochs", "1"]
    via_main = main(tiny_argv(*argv, run="a"))
    via_train = train(load_config(tiny_argv(*argv, run="b"))).metrics
    losses = [[r["loss"] for r in read_jsonl(m["run_dir"] + "/metrics.jsonl") if "loss" in r]
              for m in (via_main, via_train)]
    assert losses[0] == losses[1] and len(losses[0]) == 8
    assert via_main["test_top1"] == via_train["test_top1"]
