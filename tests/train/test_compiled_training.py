"""Compiled training through Accelerate's own switch (`accelerate launch --dynamo_backend ...`, which sets
ACCELERATE_DYNAMO_BACKEND): the model is compiled in `prepare` and trains step for step like eager.

The scan is a pair of custom ops under dynamo (ops/scan.py); a wrong gradient there would only show up in
compiled training, which no other end-to-end test runs. `aot_eager` runs dynamo and AOTAutograd (where the ops'
autograd registration is used) without inductor's code generation, so the test takes seconds on CPU.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _train(argv: list[str], backend: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_DYNAMO_BACKEND"}
    if backend:
        env["ACCELERATE_DYNAMO_BACKEND"] = backend
    proc = subprocess.run([sys.executable, str(ROOT / "msf_scale" / "train.py"), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout + proc.stderr


def test_dynamo_backend_compiles_the_model_and_trains_like_eager(tiny_argv, tmp_path):
    # no warm-up and a real lr: the default warm-up moves the weights too little in 4 steps to show a wrong gradient
    steps = ["--max-steps", "4", "--model.arch.scan_backend", "torch", "--schedule.warmup_epochs", "0",
             "--optim.lr", "0.1"]
    eager_log = _train(tiny_argv(*steps, run="eager"), None)
    compiled_log = _train(tiny_argv(*steps, run="compiled"), "aot_eager")
    assert "engine MSFMamba" in eager_log
    assert "engine OptimizedModule" in compiled_log, compiled_log[-2000:]   # it was compiled, not silently eager
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == 4
    assert compiled == pytest.approx(eager, rel=1e-5)
