"""Golden losses: short deterministic CPU runs must log exactly the losses and test top-1 recorded in
golden_losses.json, so a refactor of the loop, the builders or the ops is checked against the code before it.

The first fixture was written on the code before issue 17's refactor (train.py's `_train`). On one machine at the
recorded torch thread count (the test sets it, so a test that leaks another count cannot change the rounding) every
op here is deterministic (the numba scan runs one batch row per thread, torch's CPU kernels reduce in a fixed order),
so the comparison is exact (`==` on the JSON floats, which round-trip bit for bit) and any difference is a change of
behaviour: a planted swap of two random draws in the dt init moved 17 of 24 losses by ~2e-7 and failed it.

Another CPU rounds differently (an AMD EPYC with AVX-512 differed from the first fixture by 1.2e-7 at one step, on
the same code), so the fixture holds one set of losses per machine (`machine_key()`: CPU model, torch's CPU
capability, torch version). A machine the fixture knows is compared exactly. Any other machine is compared with a
tolerance (`UNKNOWN_MACHINE_RTOL`) against every recorded set, unless it matches one bit for bit: that still catches
a changed recipe, data stream or op (a planted lr x 1.0006 failed it), but not a change as small as the planted
2e-7 one, nor a 0.1% change of label smoothing (planted: passed). Add a machine, on a commit known to be right, with

    python tests/train/test_golden_losses.py --write

Each case is the main job's preset (`--config cpu_demo`) with a reduced model and dataset and a schedule of a few
dozen steps; the second adds what the first leaves out (multiscale fusion + ASWM, drop path, gradient
accumulation, EMA, a checkpoint every few steps).
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).with_name("golden_losses.json")
UNKNOWN_MACHINE_RTOL = 1e-5   # on a machine the fixture does not know: rounding (~1e-7), not behaviour
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


def machine_key() -> str:
    """What decides CPU rounding here: the CPU model, the SIMD level torch dispatches to, the torch version."""
    import torch

    model = platform.processor() or platform.machine()
    try:   # the first processor's name, family, model and stepping ("AMD EPYC" alone names many generations)
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                    if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        model = (f"{info.get('model name', model)} (family {info.get('cpu family', '?')} model "
                 f"{info.get('model', '?')} stepping {info.get('stepping', '?')})")
    except OSError:
        pass
    return f"{model} | {torch.backends.cpu.get_cpu_capability()} | torch {torch.__version__}"


def compare(got: dict, want: dict, rtol: float) -> list[str]:
    """The differences between two runs' losses and evaluations (exact at rtol 0), as messages."""
    if list(got["losses"]) != list(want["losses"]):
        return ["the run logged other steps than the golden run"]
    diff = {s: (got["losses"][s], w) for s, w in want["losses"].items()
            if abs(got["losses"][s] - w) > rtol * abs(w) or (rtol == 0 and got["losses"][s] != w)}
    errors = [f"losses differ at {len(diff)} steps (got, want): {diff}"] if diff else []
    evals_differ = (got["evals"] != want["evals"] if rtol == 0 else
                    [[e[0]] + [None if v is None else round(v, 6) for v in e[1:]] for e in got["evals"]]
                    != [[e[0]] + [None if v is None else round(v, 6) for v in e[1:]] for e in want["evals"]])
    if evals_differ:
        errors.append(f"evaluations differ: got {got['evals']}, want {want['evals']}")
    return errors


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_losses(name, synth_cache, tmp_path):
    """Each case runs in a fresh interpreter: in one pytest process, state that earlier tests leave behind changed
    the rounding (a fresh-clone CI run failed after tests/data + tests/measure while each passed alone)."""
    import subprocess

    golden = json.loads(GOLDEN.read_text())
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, __file__, "--case", name, str(synth_cache), str(out),
                           str(golden["torch_threads"])], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"the golden run failed:\n{proc.stderr[-3000:]}"
    got = json.loads((out / "golden_case.json").read_text())
    machines = golden["machines"]
    key = machine_key()
    if key in machines:   # a machine the fixture knows: bit for bit
        errors = compare(got, machines[key][name], 0.0)
        assert not errors, f"golden run of {key}: " + "; ".join(errors)
        return
    results = {m: compare(got, cases[name], 0.0) for m, cases in machines.items()}
    if any(not e for e in results.values()):
        return   # bit for bit equal to a recorded machine (e.g. the fixture's key was not recorded on it)
    results = {m: compare(got, cases[name], UNKNOWN_MACHINE_RTOL) for m, cases in machines.items()}
    assert any(not e for e in results.values()), (
        f"this machine ({key}) is not in the fixture, and its run differs from every recorded one beyond rtol "
        f"{UNKNOWN_MACHINE_RTOL}: " + " | ".join(f"{m}: {'; '.join(e)}" for m, e in results.items()))


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
    import subprocess

    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {"torch_threads": 2, "machines": {}}

    res = {}
    with tempfile.TemporaryDirectory() as tmp:   # each case in a fresh interpreter, as the test runs it
        for name in sorted(CASES):
            out = Path(tmp) / name
            subprocess.run([sys.executable, __file__, "--case", name, str(Path(tmp) / "cache"), str(out),
                            str(golden["torch_threads"])], check=True)
            res[name] = json.loads((out / "golden_case.json").read_text())
    golden["machines"][machine_key()] = res
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {machine_key()} into {GOLDEN}: " + ", ".join(f"{k} {len(res[k]['losses'])} steps" for k in sorted(CASES)))
