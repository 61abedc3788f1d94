"""A CPU-sized proxy of the fine-motion question (issue 14): which model changes let an SSM learn the micro preset.

    python benchmarks/fine_motion_proxy.py --out docs/fine_motion/cpu_proxy                 # every condition, seed 0
    python benchmarks/fine_motion_proxy.py --conditions msf_diffmax,vm_diffmax --seeds 0,1 --parallel 2

The data is the benchmark itself (the micro preset at 112 px, 8 of 32 frames, 4 unseen test subjects); the model is
shrunk so that a 2-core CPU trains one in ~25 min: width 64 and depth 4 instead of tiny's 192 x 24 (~0.25M
parameters, the size of the cnn3d baseline's 0.12M), the conv stem with a temporal kernel of 3 (the micro recipe's),
AdamW lr 1e-3 at batch 32, 30 epochs; cnn3d tiny itself at its calibrated 2e-3 for 150 epochs. Each (condition, seed) is one ``benchmarks/calibrate_micro.py`` process on
one thread (``--parallel`` at a time); a run whose JSON is already in ``OUT/runs`` is kept, so an interrupted study
resumes. Writes ``OUT/results.json`` and ``OUT/table.md``. What it can say: which changes matter at this size;
what it cannot: the tiny model's figures (those are the GPU studies, ``fine_motion.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--eval-every", "5", "--workers", "1", "--device", "cpu"]
SSM = ["--arch", "stem=conv", "--arch", "stem_temporal_kernel=3", "--arch", "embed_dim=64", "--arch", "depth=4",
       "--lr", "1e-3", "--epochs", "30"]
CNN = ["--model", "cnn3d", "--lr", "2e-3", "--epochs", "150", "--eval-every", "10"]   # its in-memory calibration
DIFF, MAX = ["--arch", "stem_input=rgb_diff"], ["--arch", "pool=max"]
CONDITIONS: dict[str, list[str]] = {   # name -> calibrate_micro flags after COMMON (a later flag wins)
    "msf": ["--model", "msf_mamba", *SSM],
    "msf_diff": ["--model", "msf_mamba", *SSM, *DIFF],
    "msf_max": ["--model", "msf_mamba", *SSM, *MAX],
    "msf_diffmax": ["--model", "msf_mamba", *SSM, *DIFF, *MAX],
    "msf_diffmax_theta0": ["--model", "msf_mamba", *SSM, *DIFF, *MAX, "--arch", "fusion_theta=0"],
    "vm_diffmax": ["--model", "videomamba", *SSM, *DIFF, *MAX],
    "msf_max_theta0": ["--model", "msf_mamba", *SSM, *MAX, "--arch", "fusion_theta=0"],
    "vm_max": ["--model", "videomamba", *SSM, *MAX],
    "plus_max": ["--model", "msf_mamba_plus", *SSM, *MAX],   # claim 3: scales 3, 5, 7 + ASWM
    "cnn3d": CNN,
    "cnn3d_diff": [*CNN, *DIFF],
}

DEFAULT = [n for n in CONDITIONS if n != "plus_max"]


def summarise(result: dict) -> dict:
    curve = result["curve"]
    left = next((r["epoch"] for r in curve if r["test_top1"] > 25.0), None)   # chance is 12.5%
    last = curve[-1]
    return {"test_top1": last["test_top1"], "best_test_top1": max(r["test_top1"] for r in curve),
            "train_top1": last["train_top1"], "train_loss": last["train_loss"], "first_epoch_over_25": left,
            "epochs": last["epoch"], "train_s": result["train_s"], "params": result["params"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conditions", default=",".join(DEFAULT), help=f"comma-separated, of: {', '.join(CONDITIONS)} "
                    "(default: all but plus_max, whose 5^3 / 7^3 fusion made it ~1.3x slower than msf per epoch on CPU)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--epochs", type=int, default=None, help="override every condition's epochs (SSMs 30, cnn3d 150)")
    ap.add_argument("--parallel", type=int, default=2, help="runs at once, one thread each")
    ap.add_argument("--cache", default="/tmp/microcache", help="rendered clips, shared by every run")
    ap.add_argument("--out", default="reports/fine_motion_proxy")
    args = ap.parse_args(argv)
    names = args.conditions.split(",")
    unknown = [n for n in names if n not in CONDITIONS]
    if unknown:
        ap.error(f"unknown conditions {unknown}; choose from {', '.join(CONDITIONS)}")
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    cal = [sys.executable, str(ROOT / "benchmarks" / "calibrate_micro.py"), "--cache", args.cache]
    subprocess.run([*cal, "--render-only", "--workers", str(os.cpu_count() or 1)], check=True, cwd=ROOT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    jobs = [(n, int(s)) for s in args.seeds.split(",") for n in names]
    epochs = ["--epochs", str(args.epochs)] if args.epochs else []
    commands = {job: [*cal, *COMMON, *CONDITIONS[job[0]], *epochs, "--seed", str(job[1]),
                      "--out", str(out / "runs" / f"{job[0]}_s{job[1]}.json")] for job in jobs}
    pending = [j for j in jobs if not (out / "runs" / f"{j[0]}_s{j[1]}.json").is_file()]
    running: dict = {}
    t0 = time.time()
    while pending or running:
        while pending and len(running) < args.parallel:
            job = pending.pop(0)
            log = open(out / "runs" / f"{job[0]}_s{job[1]}.log", "w")
            running[job] = (subprocess.Popen(commands[job], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log)
        for job, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[job]
                print(f"[{time.time() - t0:6.0f} s] {job[0]} seed {job[1]}: exit {proc.returncode}", flush=True)
        time.sleep(2)
    runs = {}
    for name, seed in jobs:
        path = out / "runs" / f"{name}_s{seed}.json"
        if path.is_file():
            runs[f"{name}_s{seed}"] = {"condition": name, "seed": seed, "command": commands[(name, seed)][1:],
                                       **summarise(json.loads(path.read_text()))}
    (out / "results.json").write_text(json.dumps({"common": COMMON, "conditions": CONDITIONS, "runs": runs}, indent=1))
    lines = ["| condition | flags | test top-1 % (final) | per seed | best of evaluations | train top-1 % | "
             "first epoch > 25% test | wall s per run |", "|---|---|---|---|---|---|---|---|"]
    for name in names:
        rs = [r for r in runs.values() if r["condition"] == name]
        if not rs:
            continue
        tops = [r["test_top1"] for r in rs]
        mean = f"{statistics.mean(tops):.1f}" + (f" +- {statistics.stdev(tops):.1f}" if len(tops) > 1 else "")

        def each(key: str, fmt: str = "{:.1f}") -> str:
            return " / ".join("-" if r[key] is None else fmt.format(r[key]) for r in rs)
        lines.append(f"| {name} | `{' '.join(CONDITIONS[name])}` | {mean} | {each('test_top1')} "
                     f"| {each('best_test_top1')} | {each('train_top1')} | {each('first_epoch_over_25', '{}')} "
                     f"| {statistics.mean(r['train_s'] for r in rs):.0f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
