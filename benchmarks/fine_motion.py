"""Fine motion: what each model learns on the micro preset, through the real train.py, several runs at once.

    python benchmarks/fine_motion.py --study claims --seeds 0,1,2 --out reports/fine_motion   # the paper's claims
    python benchmarks/fine_motion.py --conditions cnn3d,msf_conv3 --seeds 0 --parallel 4 --epochs 40

Generates the micro dataset once (``msf-scale data synth --preset micro``, or ``--data DIR``), then trains every
(condition, seed) as its own ``msf_scale/train.py`` process (``--parallel`` at a time: tiny models at 112 px leave a
GPU mostly idle) with one shared recipe (``RECIPE``; a condition adds only its own flags), reads each run's
``final_metrics.json`` / ``metrics.jsonl``, measures how much the CFD fusion contributes inside the trained model
(``fusion_share``: ||F|| / ||H|| at the fused blocks on test clips), and writes ``results.json``, a Markdown
table of mean +- sd test top-1 over seeds, and ``logs.tgz`` (each run's log, config, metrics and final metrics, no
weights or checkpoints: small enough to come back from a lent GPU). Test top-1 here is the final, unselected
evaluation.
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

# The shared recipe of every run (train.py flags; configs/tiny/micro.yaml less its arch options, which are conditions
# here). 20 epochs of 576 clips, batch 32, AdamW with warm-up + cosine,
# no crop, no drop path, no label smoothing, one test view. lr is per 256 clips (train.py scales it by the batch):
# 4e-3 = 5e-4 at batch 32; the SSMs stayed at chance at 8e-3 (1e-3 at 32) in the in-memory sweep (BENCHMARKS.md).
RECIPE = ["--epochs", "20", "--schedule.warmup_epochs", "2", "--train.batch_size", "32", "--optim.lr", "4e-3",
          "--optim.label_smoothing", "0", "--model.drop_path_rate", "0", "--data.min_scale", "1.0",
          "--model.img_size", "112", "--model.num_frames", "8", "--data.num_clips", "1", "--data.num_crops", "1",
          "--train.eval_every", "5", "--log.tensorboard", "false", "--log.progress", "false",
          "--log.log_every", "20", "--data.num_workers", "2"]

_CONV3 = ["--model.arch.stem", "conv", "--model.arch.stem_temporal_kernel", "3"]
_MAX = ["--model.arch.pool", "max"]
_DIFFMAX = ["--model.arch.stem_input", "rgb_diff", *_MAX]
# name -> (variant, extra flags)
CONDITIONS: dict[str, tuple[str, list[str]]] = {
    "cnn3d": ("cnn3d", ["--optim.lr", "1.6e-2", "--epochs", "150"]),   # its calibrated schedule (BENCHMARKS.md)
    "cnn3d_diff": ("cnn3d", ["--optim.lr", "1.6e-2", "--epochs", "150", "--model.arch.stem_input", "rgb_diff"]),
    "videomamba": ("videomamba", []),
    "msf_mamba": ("msf_mamba", []),
    "msf_mamba_theta0": ("msf_mamba", ["--model.arch.fusion_theta", "0"]),
    "msf_mamba_plus": ("msf_mamba_plus", []),
    "msf_patch8": ("msf_mamba", ["--model.arch.patch_size", "8"]),
    "msf_tubelet2": ("msf_mamba", ["--model.arch.tubelet_size", "2"]),
    "msf_conv1": ("msf_mamba", ["--model.arch.stem", "conv"]),
    "msf_conv3": ("msf_mamba", ["--model.arch.stem", "conv", "--model.arch.stem_temporal_kernel", "3"]),
    "vm_conv3": ("videomamba", ["--model.arch.stem", "conv", "--model.arch.stem_temporal_kernel", "3"]),
    "msf_conv3_theta0": ("msf_mamba", ["--model.arch.stem", "conv", "--model.arch.stem_temporal_kernel", "3",
                                       "--model.arch.fusion_theta", "0"]),
    "plus_conv3": ("msf_mamba_plus", ["--model.arch.stem", "conv", "--model.arch.stem_temporal_kernel", "3"]),
    # [ours] the stem also sees frame differences and the head max-pools the tokens (README, "Fine motion")
    "msf_conv3_diffmax": ("msf_mamba", [*_CONV3, *_DIFFMAX]),
    "vm_conv3_diffmax": ("videomamba", [*_CONV3, *_DIFFMAX]),
    "msf_conv3_diffmax_theta0": ("msf_mamba", [*_CONV3, *_DIFFMAX, "--model.arch.fusion_theta", "0"]),
    "plus_conv3_diffmax": ("msf_mamba_plus", [*_CONV3, *_DIFFMAX]),
    # [ours] max pooling alone (the CPU proxy's main factor, docs/BENCHMARKS.md "Fine motion")
    "msf_conv3_max": ("msf_mamba", [*_CONV3, *_MAX]),
    "vm_conv3_max": ("videomamba", [*_CONV3, *_MAX]),
    "msf_conv3_max_theta0": ("msf_mamba", [*_CONV3, *_MAX, "--model.arch.fusion_theta", "0"]),
    "plus_conv3_max": ("msf_mamba_plus", [*_CONV3, *_MAX]),
    "msf_uniform": ("msf_mamba", ["--model.arch.fusion_init", "uniform"]),
    "msf_lr3e-2": ("msf_mamba", ["--optim.lr", "3e-2"]),
    "msf_conv3_lr3e-2": ("msf_mamba", ["--model.arch.stem", "conv", "--model.arch.stem_temporal_kernel", "3",
                                       "--optim.lr", "3e-2"]),
}
STUDIES = {
    "why": ["cnn3d", "msf_mamba", "videomamba", "msf_patch8", "msf_tubelet2", "msf_conv1", "msf_conv3", "vm_conv3",
            "msf_uniform", "msf_lr3e-2"],
    "claims": ["cnn3d", "videomamba", "msf_mamba", "msf_mamba_theta0", "msf_mamba_plus"],
    "claims_conv3": ["cnn3d", "vm_conv3", "msf_conv3", "msf_conv3_theta0", "plus_conv3"],
    "claims_max": ["cnn3d", "vm_conv3_max", "msf_conv3_max", "msf_conv3_max_theta0", "plus_conv3_max"],
    "claims_diffmax": ["cnn3d", "cnn3d_diff", "vm_conv3_diffmax", "msf_conv3_diffmax", "msf_conv3_diffmax_theta0",
                       "plus_conv3_diffmax"],
}


def fusion_share(run_dir: Path, data: str, batches: int = 2) -> float | None:
    """Mean ||F|| / ||H|| over the fused blocks of a trained run on test clips: 0 means the fusion does nothing."""
    import torch

    from msf_scale.export import load_model
    from msf_scale.data import build_eval_loader

    model = load_model(run_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    fusions = [b.fusion for b in getattr(model, "blocks", []) if getattr(b, "fusion", None) is not None]
    if not fusions:
        return None
    ratios: list[float] = []
    hooks = [f.register_forward_hook(lambda m, i, o: ratios.append((o.norm() / i[0].norm().clamp_min(1e-12)).item()))
             for f in fusions]
    cfg = model.cfg
    loader = build_eval_loader(data, "test", batch_size=16, num_frames=cfg.num_frames, img_size=cfg.img_size,
                               num_workers=0)
    with torch.no_grad():
        for i, (video, _, _) in enumerate(loader):   # video [B, views, 3, T, S, S]
            if i >= batches:
                break
            model(video.flatten(0, 1).to(next(model.parameters()).device))
    for h in hooks:
        h.remove()
    return round(statistics.fmean(ratios), 4) if ratios else None


def pack_logs(out: Path, names: list[str]) -> Path:
    """out/logs.tgz: every run's log and small records (what a study's table is made of), never its weights."""
    import tarfile

    small = ("config.yaml", "run_meta.json", "metrics.jsonl", "final_metrics.json", "eval.json")
    with tarfile.open(out / "logs.tgz", "w:gz") as tar:
        for name in names:
            for f in [out / "runs" / f"{name}.log", *(out / "runs" / name / s for s in small)]:
                if f.is_file():
                    tar.add(f, arcname=str(f.relative_to(out)))
    return out / "logs.tgz"


def summarise(run_dir: Path) -> dict:
    final = json.loads((run_dir / "final_metrics.json").read_text()) if (run_dir / "final_metrics.json").is_file() else {}
    curve = []
    if (run_dir / "metrics.jsonl").is_file():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            if "test_top1" in row:
                curve.append((row.get("epoch"), round(row["test_top1"] * 100, 1)))
    return {"test_top1": None if "test_top1" not in final else round(final["test_top1"] * 100, 1),
            "train_top1": None if "train_top1" not in final else round(final["train_top1"] * 100, 1),
            "loss": final.get("loss"), "wall_s": final.get("wall_s"), "eval_curve": curve}


def seed_cell(run: dict) -> str:
    """One run's entry in the table: its final test top-1, or for a stopped or failed run what it reached (the
    last evaluation of its curve), so a device call cut short still says how far each run got."""
    if run["test_top1"] is not None:
        return str(run["test_top1"])
    state = "killed" if "killed" in str(run.get("status")) else "failed"
    curve = run.get("eval_curve") or []
    return f"{state} (epoch {curve[-1][0]}: {curve[-1][1]})" if curve else state


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", choices=sorted(STUDIES), default=None, help="a named list of conditions")
    ap.add_argument("--conditions", default=None, help=f"comma-separated, of: {', '.join(CONDITIONS)}")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--runs", default=None, help="explicit condition:seed pairs, e.g. cnn3d:0,cnn3d:1,msf_conv3:0")
    ap.add_argument("--data", default=None, help="micro dataset dir (default: generate into OUT/data)")
    ap.add_argument("--out", default="reports/fine_motion")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's 20 epochs (not a condition's own, e.g. cnn3d's 150)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run before it is killed")
    ap.add_argument("--extra", default="", help="flags added to every run, e.g. '--train.precision fp32'")
    args = ap.parse_args(argv)
    pairs = []
    for item in (args.runs.split(",") if args.runs else []):
        name, _, seed = item.partition(":")
        if not seed.isdigit():
            ap.error(f"--runs wants condition:seed pairs, got {item!r}")
        pairs.append((name, int(seed)))   # a condition named here runs only its listed seeds
    names = ((STUDIES[args.study] if args.study else []) + (args.conditions.split(",") if args.conditions else [])
             + [n for n, _ in pairs])
    unknown = [n for n in names if n not in CONDITIONS]
    if not names or unknown:
        ap.error(f"unknown or no conditions {unknown}; choose from {', '.join(CONDITIONS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    data = args.data
    if data is None:
        data = str(out / "data")
        if not (Path(data) / "dataset.json").is_file():
            subprocess.run([sys.executable, "-m", "msf_scale.cli", "data", "synth", "--preset", "micro", "--out", data],
                           check=True, cwd=ROOT)
    # one intra-op thread per run: several runs share the host's cores, and each only launches GPU kernels
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    jobs = list(dict.fromkeys([(n, s) for s in seeds for n in dict.fromkeys(names) if (n, s) not in pairs
                               and not any(p[0] == n for p in pairs)] + pairs))
    pending, running, t0 = list(jobs), {}, time.time()
    commands: dict[tuple[str, int], list[str]] = {}
    exits: dict[tuple[str, int], str] = {}
    while pending or running:
        while pending and len(running) < args.parallel:
            name, seed = pending.pop(0)
            variant, flags = CONDITIONS[name]
            run_dir = out / "runs" / f"{name}_s{seed}"
            epochs = ["--epochs", str(args.epochs)] if args.epochs and "--epochs" not in flags else []
            cmd = [sys.executable, str(ROOT / "msf_scale" / "train.py"), "--variant", variant, "--size", "tiny",
                   "--data", data, "--output-dir", str(run_dir), "--train.seed", str(seed), *RECIPE, *flags, *epochs,
                   *args.extra.split()]
            commands[(name, seed)] = cmd[1:]
            log = open(out / "runs" / f"{name}_s{seed}.log", "w")
            running[(name, seed)] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT),
                                     time.time(), log)
        for key, (proc, started, log) in list(running.items()):
            if proc.poll() is None and time.time() - started > args.timeout:
                proc.kill()
                exits[key] = f"killed after {args.timeout:.0f} s (--timeout)"
            if proc.poll() is not None:
                log.close()
                del running[key]
                exits.setdefault(key, f"exit {proc.returncode}")
                print(f"[{time.time() - t0:6.0f} s] {key[0]} seed {key[1]}: exit {proc.returncode}", flush=True)
        time.sleep(1)
    results = {}
    for name, seed in jobs:
        run_dir = out / "runs" / f"{name}_s{seed}"
        r = summarise(run_dir)
        try:
            r["fusion_share"] = fusion_share(run_dir, data) if r["test_top1"] is not None else None
        except Exception as e:   # a measurement, not the result: report and go on
            r["fusion_share"] = f"error: {e}"
        results[f"{name}_s{seed}"] = {"condition": name, "seed": seed, "status": exits.get((name, seed)),
                                      "command": commands.get((name, seed)), **r}
    info = json.loads((Path(data) / "dataset.json").read_text())
    (out / "results.json").write_text(json.dumps({"recipe": RECIPE, "extra": args.extra, "epochs": args.epochs,
                                                  "data": {"root": data, "name": info.get("name"),
                                                           "source": info.get("source")},
                                                  "conditions": {n: CONDITIONS[n] for n in names},
                                                  "runs": results}, indent=1))
    lines = ["| condition | variant | extra flags | test top-1 % (mean +- sd) | per seed | train top-1 % | "
             "fusion ||F||/||H|| | wall s |", "|---|---|---|---|---|---|---|---|"]

    def mean_of(values: list, fmt: str = "{:.1f}") -> str:
        values = [v for v in values if isinstance(v, (int, float))]
        return fmt.format(statistics.fmean(values)) if values else "-"

    for name in dict.fromkeys(names):
        rs = [r for r in results.values() if r["condition"] == name]
        acc = [r["test_top1"] for r in rs if r["test_top1"] is not None]
        test = (f"{statistics.fmean(acc):.1f} +- {statistics.stdev(acc):.1f}" if len(acc) > 1
                else f"{acc[0]:.1f}" if acc else "failed")
        per_seed = ", ".join(seed_cell(r) for r in rs)
        variant, flags = CONDITIONS[name]
        lines.append(f"| {name} | {variant} | {' '.join(flags + args.extra.split()) or '-'} | {test} | {per_seed} | "
                     f"{mean_of([r['train_top1'] for r in rs])} | {mean_of([r['fusion_share'] for r in rs], '{:.3f}')} "
                     f"| {mean_of([r['wall_s'] for r in rs], '{:.0f}')} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    pack_logs(out, [f"{n}_s{s}" for n, s in jobs])
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
