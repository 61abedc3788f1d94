"""Golden losses: short deterministic CPU runs must log exactly the losses and test top-1 recorded in
golden_losses.json, so a refactor of the loop, the builders or the ops is checked against the code before it.

The fixture was written on the code before issue 17's refactor (train.py's `_train`). The comparison is exact
(`==` on the JSON floats, which round-trip bit for bit): on one machine at the recorded torch thread count (the test
sets it, so a test that leaks another count cannot change the rounding) every op here is
deterministic (the numba scan runs one batch row per thread, torch's CPU kernels reduce in a fixed order), so any
difference is a change of behaviour. Another machine (other CPU, BLAS or thread count) may round differently:
regenerate there, on a commit known to be right, with

    python tests/train/test_golden_losses.py --write

Each case is the main job's preset (`--config cpu_demo`) with a reduced model and dataset and a schedule of a few
dozen steps; the second adds what the first leaves out (multiscale fusion + ASWM, drop path, gradient
accumulation, EMA, a checkpoint every few steps).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).with_name("golden_losses.json")
_COMMON = ["--config", "cpu_demo", "--model.arch.depth", "4", "--model.arch.embed_dim", "64",
           "--data.num_workers", "0", "--data.synth.train_per_class", "4", "--data.synth.test_per_class", "2",
           "--data.synth.shard_size", "8", "--train.batch_size", "8", "--log.log_every", "1",
           "--log.tensorboard", "false", "--log.progress", "false"]
CASES = {
    "msf_mamba": ["--epochs", "6", "--schedule.warmup_epochs", "1", "--train.eval_every", "2"],
    "msf_mamba_plus_accum_ema": ["--variant", "msf_mamba_plus", "--epochs", "8", "--schedule.warmup_epochs", "1",
                                 "--train.grad_accum", "2", "--model.drop_path_rate", "0.1", "--train.ema", "true",
                                 "--train.ema_decay", "0.9", "--train.eval_every", "4", "--train.ckpt_every", "3",
                                 "--optim.label_smoothing", "0.1", "--train.seed", "3"],
}


def run_case(name: str, cache: Path, out: Path) -> dict:
    """Train one case; -> {"losses": {step: loss}, "evals": [[step, test_top1, test_top5, ema_test_top1 or None], ...]}."""
    from msf_scale.metrics import read_jsonl
    from msf_scale.train import main

    main([*_COMMON, *CASES[name], "--data.synth.cache_dir", str(cache), "--output-dir", str(out)])
    rows = read_jsonl(out / "metrics.jsonl")
    return {"losses": {str(r["step"]): r["loss"] for r in rows if "loss" in r},
            "evals": [[r["step"], r["test_top1"], r["test_top5"], r.get("ema_test_top1")] for r in rows if "test_top1" in r]}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_losses(name, synth_cache, tmp_path):
    """Each case runs in a fresh interpreter: in one pytest process, state that earlier tests leave behind changed
    the rounding (a fresh-clone CI run failed after tests/data + tests/measure while each passed alone)."""
    import subprocess

    golden = json.loads(GOLDEN.read_text())
    want = golden[name]
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, __file__, "--case", name, str(synth_cache), str(out),
                           str(golden["torch_threads"])], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"the golden run failed:\n{proc.stderr[-3000:]}"
    got = json.loads((out / "golden_case.json").read_text())
    assert list(got["losses"]) == list(want["losses"]), "the run logged other steps than the golden run"
    diff = {s: (got["losses"][s], want["losses"][s]) for s in want["losses"] if got["losses"][s] != want["losses"][s]}
    assert not diff, f"losses differ from the golden run at {len(diff)} steps (got, want): {diff}"
    assert got["evals"] == want["evals"], f"evaluations differ: got {got['evals']}, want {want['evals']}"


if __name__ == "__main__":  # python tests/train/test_golden_losses.py --write
    import tempfile

    if sys.argv[1:2] == ["--case"]:   # the test's fresh interpreter: --case NAME CACHE OUT THREADS
        import torch

        _, _, case, cache_dir, out_dir, n_threads = sys.argv
        torch.set_num_threads(int(n_threads))   # CPU reductions round by thread count: run as recorded
        result = run_case(case, Path(cache_dir), Path(out_dir))
        (Path(out_dir) / "golden_case.json").write_text(json.dumps(result))
        raise SystemExit(0)
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python tests/train/test_golden_losses.py --write")
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        res = {name: run_case(name, Path(tmp) / "cache", Path(tmp) / name) for name in sorted(CASES)}
    res["torch_threads"] = torch.get_num_threads()
    GOLDEN.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {GOLDEN}: " + ", ".join(f"{k} {len(res[k]['losses'])} steps" for k in sorted(CASES)))
