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
import torch

ROOT = Path(__file__).resolve().parents[2]


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _train(argv: list[str], backend: str | None, regional: bool = False) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_DYNAMO_")}
    if backend:
        env["ACCELERATE_DYNAMO_BACKEND"] = backend
    if regional:   # what `accelerate launch --dynamo_use_regional_compilation` sets
        env["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] = "true"
    proc = subprocess.run([sys.executable, str(ROOT / "msf_scale" / "train.py"), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout + proc.stderr


# No warm-up and a real lr: the default warm-up moves the weights too little in 4 steps to show a wrong gradient.
# No drop path: compiled, DropPath draws with another op than eager's bernoulli_ (models/blocks.py says why).
# The EMA on: it reads the compiled model's parameters by name.
STEPS = ["--max-steps", "4", "--model.arch.scan_backend", "torch", "--schedule.warmup_epochs", "0", "--optim.lr", "0.1",
         "--model.drop_path_rate", "0", "--train.ema", "true"]


def _export_matches(a: Path, b: Path) -> None:
    """Both runs' exports load by the model's own parameter names (compiled modules name theirs `_orig_mod.*`) and
    give the same logits, the EMA's too."""
    from msf_scale.export import load_model

    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        for ema in (False, True):
            # to 1e-3: the last step's update, which no logged loss shows, can move them ~1e-4 apart (Adam)
            torch.testing.assert_close(load_model(a, ema=ema)(x), load_model(b, ema=ema)(x), rtol=1e-2, atol=1e-3)


def test_dynamo_backend_compiles_the_model_and_trains_like_eager(tiny_argv, tmp_path):
    eager_log = _train(tiny_argv(*STEPS, run="eager"), None)
    compiled_log = _train(tiny_argv(*STEPS, run="compiled"), "aot_eager")
    assert "engine MSFMamba, compiled: no" in eager_log
    # it was compiled, not silently eager
    assert "engine OptimizedModule, compiled: whole" in compiled_log, compiled_log[-2000:]
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == 4
    assert compiled == pytest.approx(eager, rel=1e-5)
    _export_matches(tmp_path / "compiled", tmp_path / "eager")


def test_regional_compilation_compiles_each_block_and_trains_like_eager(tiny_argv, tmp_path):
    # --dynamo_use_regional_compilation: Accelerate compiles each repeated block (and the other top-level modules)
    # on its own; the model object stays the model's class. A scan gradient planted 1.5x off fails the losses.
    argv = [*STEPS, "--variant", "msf_mamba_plus"]
    eager_log = _train(tiny_argv(*argv, run="eager"), None)
    regional_log = _train(tiny_argv(*argv, run="regional"), "aot_eager", regional=True)
    assert "compiled: no" in eager_log
    assert "engine MSFMamba, compiled: regional (" in regional_log, regional_log[-2000:]
    eager, regional = _losses(tmp_path / "eager"), _losses(tmp_path / "regional")
    assert len(eager) == 4
    assert regional == pytest.approx(eager, rel=1e-5)
    _export_matches(tmp_path / "regional", tmp_path / "eager")
