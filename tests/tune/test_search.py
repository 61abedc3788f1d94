"""Real Ray Tune searches on CPU (a local Ray runtime, 2 CPUs): the tiny stand-in model on the tiny synthetic
dataset with a val split, 2 epochs a trial. An ASHA search completes and writes a best config that train.py runs;
a trial that raises is retried, then reported failed, while the search finishes; an interrupted search resumes
without rerunning its finished trial."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from msf_scale.config import load_config
from msf_scale.tune import BEST_YAML, CURVES_PNG, STARTS, TRIALS_CSV, TRIALS_MD, SearchOptions, run_search

pytestmark = pytest.mark.slow
# the dataset's own val split: 2 subjects, 1 clip per class (8 clips; test has 16, so a report says which it read)
VAL = ["data.synth.val_subjects=2", "data.synth.val_per_class=1"]


def _opts(tmp_path, sets, space, **kw):
    return SearchOptions(size="tiny", sets=sets, storage=str(tmp_path / "runs"), space=space, cpus_per_trial=1,
                         verbose=0, **kw)


def _trial_rows(exp: Path) -> list[dict]:
    return list(csv.DictReader((exp / TRIALS_CSV).open()))


def test_asha_search_completes_and_train_accepts_its_best_config(ray_local, tmp_path, tiny_sets, space_file):
    summary = run_search(_opts(tmp_path, [*tiny_sets, *VAL], space_file(), num_samples=2, scheduler="asha"))
    exp = Path(summary["experiment"])
    rows = _trial_rows(exp)
    assert len(rows) == 2 and {r["status"] for r in rows} <= {"completed", "stopped early"}
    assert "completed" in {r["status"] for r in rows}       # the rung keeps the better one to the end
    for r in summary["rows"]:                                 # one report a epoch, each on val
        assert [e for e, _ in r["history"]] == list(range(1, r["epochs"] + 1)) and r["starts"] == 1
        reports = _rows(Path(r["dir"]) / "result.json")
        assert [x["val_samples"] for x in reports] == [8] * r["epochs"]          # the 8 val clips, not the 16 test
        logged = _rows(Path(r["dir"]) / "run" / "metrics.jsonl")
        evals = [x for x in logged if "val_top1" in x]
        assert [x["val_top1"] for x in reports] == [x["val_top1"] for x in evals][:r["epochs"]]  # the loop's own
        assert not any("test_top1" in x for x in logged)     # a trial never evaluates test (train.final_test false)
    assert (exp / TRIALS_MD).read_text().startswith("| trial | status | optim.lr | optim.weight_decay |")
    assert (exp / CURVES_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = summary["best"]
    assert best["val_top1"] == max(float(r["val_top1"]) for r in rows if r["status"] == "completed")
    # the best config is the user's (original dataset, not the tuning view) with the best trial's values
    path = exp / BEST_YAML
    cfg = load_config(["--config", str(path)])
    assert cfg.optim.lr == pytest.approx(best["optim.lr"]) and cfg.optim.weight_decay == pytest.approx(
        best["optim.weight_decay"])
    assert cfg.data.root is None and cfg.data.synth["val_subjects"] == 2 and cfg.train.output_dir is None
    assert cfg.train.eval_every == 0 or cfg.train.eval_every == load_config(["--size", "tiny"]).train.eval_every
    from msf_scale.train import main
    final = main(["--config", str(path), "--output-dir", str(tmp_path / "final"), "--max-steps", "2"])
    assert final["step"] == 2 and 0 <= final["test_top1"] <= 1   # the final run reports on the real test split
    assert final["best_selected_on"] == "val_top1" and final["test_samples"] == 16   # once, at the end


def test_a_trial_that_raises_is_retried_then_reported_failed_and_the_search_finishes(ray_local, tmp_path,
                                                                                  tiny_sets, space_file):
    # grad_accum 4096 is a valid config, but the loop raises at start-up: an epoch has 4 batches, fewer than that
    space = space_file("space:\n  train.grad_accum: {grid: [1, 4096]}\n")
    summary = run_search(_opts(tmp_path, [*tiny_sets, *VAL], space, num_samples=1, scheduler="fifo",
                               max_failures=1))
    by_accum = {int(r["train.grad_accum"]): r for r in summary["rows"]}
    bad, good = by_accum[4096], by_accum[1]
    assert bad["status"] == "failed" and "fewer than train.grad_accum=4096" in bad["error"]
    assert bad["starts"] == 2                               # retried once (max_failures=1), then given up
    assert good["status"] == "completed" and good["epochs"] == 2 and good["starts"] == 1
    assert summary["best"]["trial"] == good["trial"]
    csv_rows = {r["trial"]: r for r in _trial_rows(Path(summary["experiment"]))}
    assert csv_rows[bad["trial"]]["status"] == "failed" and "grad_accum" in csv_rows[bad["trial"]]["error"]


def _cli(tmp_path, sets, space, *extra):
    argv = [sys.executable, "-m", "msf_scale.cli", "tune", "--size", "tiny", "--num-samples", "1",
            "--scheduler", "fifo", "--storage", str(tmp_path / "runs"), "--space", space, "--max-concurrent", "1",
            "--name", "resumable", *extra]
    for s in sets:
        argv += ["--set", s]
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS")
    return argv, env


def _wait(pred, timeout, proc):
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, f"the search exited early ({proc.returncode})"
        assert time.time() - t0 < timeout, "timed out waiting for the search"
        time.sleep(0.2)


def test_resuming_an_interrupted_search_does_not_rerun_finished_trials(tmp_path, tiny_sets, space_file):
    space = space_file("space:\n  optim.lr: {grid: [0.004, 0.008]}\n")
    sets = [*tiny_sets, *VAL, "schedule.epochs=3"]
    argv, env = _cli(tmp_path, sets, space)
    exp = tmp_path / "runs" / "resumable"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        trials = lambda: sorted(p for p in exp.glob("trial_*") if (p / STARTS).is_file())  # noqa: E731
        # the first trial has finished and the second reported its first epoch (it has a Tune checkpoint)
        _wait(lambda: len(trials()) == 2 and (trials()[0] / "run" / "final_metrics.json").is_file()
              and len(_rows(trials()[1] / "result.json")) >= 1, 240, proc)
        proc.send_signal(signal.SIGINT)                      # what Ctrl-C does: Tune saves its state and stops
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    first, second = trials()
    first_results = (first / "result.json").read_text()
    assert len(_rows(second / "result.json")) < 3, "the second trial finished before the interrupt"
    argv, env = _cli(tmp_path, sets, space, "--resume")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(_rows(first / STARTS)) == 1                   # the finished trial was not run again
    assert (first / "result.json").read_text() == first_results
    starts = _rows(second / STARTS)
    assert len(starts) == 2 and starts[1]["from_epoch"] >= 1  # the unfinished one resumed from its checkpoint
    rows = {r["trial"]: r for r in _trial_rows(exp)}
    # the same two trials, no new one (a finished trial restarted by Tune would come back under a new id)
    assert sorted(rows) == [first.name.removeprefix("trial_"), second.name.removeprefix("trial_")]
    assert sorted(exp.glob("trial_*")) == [first, second]
    assert [r["status"] for r in rows.values()] == ["completed", "completed"]
    assert [int(r["epochs"]) for r in rows.values()] == [3, 3]
    epochs = [r["epoch"] for r in _rows(second / "result.json")]
    assert sorted(set(epochs)) == [1, 2, 3]


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
