"""The latency table of every variant x size (GPU): eager, CUDA-graph replay and torch.compile.

    python benchmarks/bench_latency.py --out OUT [--frames 8 --img-size 224 --views 6 --batch 64]
        [--modes eager,graph,compile] [--compile-measures clip] [--budget-s 330] [--models a,b,...]
        [--runs-per 50] [--throughput-runs 20] [--warmup 10]

Writes OUT/latency.csv and OUT/latency.json (msf_scale.latency's format, so `msf-scale curve` reads it) after
every model, so a run stopped by its time budget keeps what it measured; the Markdown table (ms, median / p90 of
``--runs-per`` batch-1 runs) goes to stdout. Models are timed with random weights (latency needs no training).
torch.compile compiles once per input shape (tens of seconds for a 24-32 block model): ``--compile-measures``
limits it (default: batch-1 clip only), and it starts no new model once ``--budget-s`` seconds have passed
since the start: those models get a "skipped" row, never silently left out. Eager and graph always run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from msf_scale import latency as lat  # noqa: E402
from msf_scale.models import create_model, list_models  # noqa: E402

DEFAULT_MODELS = [f"{v}_{s}" for v in ("videomamba", "msf_mamba", "msf_mamba_plus") for s in ("tiny", "small", "base")]


def table(rows: list[lat.Row]) -> str:
    """model x size grid: 'eager / graph / compile' batch-1 clip medians (ms), as issue 15's table."""
    cell: dict[tuple[str, str], dict[str, str]] = {}
    for r in rows:
        if r.measure == "clip":
            cell.setdefault((r.variant, r.size), {})[r.mode] = "—" if r.median_ms is None else f"{r.median_ms:.2f}"
    variants = sorted({v for v, _ in cell}, key=lambda v: DEFAULT_MODELS.index(f"{v}_tiny") if f"{v}_tiny" in DEFAULT_MODELS else 99)
    modes = [m for m in lat.MODES if any(m in c for c in cell.values())]
    out = [f"batch-1 latency per clip, ms ({' / '.join(modes)}):", "", "| size | " + " | ".join(variants) + " |",
           "|---|" + "---|" * len(variants)]
    for size in ("tiny", "small", "base"):
        out.append(f"| {size} | " + " | ".join(" / ".join(cell.get((v, size), {}).get(m, "—") for m in modes)
                                              for v in variants) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=32)
    p.add_argument("--views", type=int, default=6)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--modes", default="eager,graph,compile")
    p.add_argument("--compile-measures", default="clip")
    p.add_argument("--runs-per", type=int, default=50)
    p.add_argument("--throughput-runs", type=int, default=20, help="timed runs of the large-batch row")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds from the start after which the compile pass starts no new model")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    modes = args.modes.split(",")
    names = args.models.split(",")
    unknown = [n for n in names if n not in list_models()]
    if unknown:
        p.error(f"unknown models {unknown}; registered: {list_models()}")
    t0 = time.monotonic()
    env = lat.environment(device)
    rows: list[lat.Row] = []
    # eager and graph first for every model (cheap), torch.compile after (the slow, budgeted part)
    passes = [(m, "clip,video,throughput") for m in modes if m != "compile"]
    passes += [("compile", args.compile_measures)] if "compile" in modes else []
    for mode, measures in passes:
        for name in names:
            variant, size = name.rsplit("_", 1)
            if mode == "compile" and args.budget_s is not None and time.monotonic() - t0 > args.budget_s:
                rows.append(lat.Row(model=name, variant=variant, size=size, source="registry", mode=mode,
                                    measure="clip", batch=1, input=f"3 x {args.frames} x {args.img_size} x {args.img_size}",
                                    dtype="fp32" if dtype is None else "bf16", median_ms=None, p90_ms=None, mean_ms=None, min_ms=None, runs=0,
                                    clips_per_s=None, peak_mem_gb=None, device=str(device),
                                    error=f"skipped: --budget-s {args.budget_s:.0f} spent"))
                continue
            model = create_model(name, num_classes=args.num_classes, num_frames=args.frames, img_size=args.img_size,
                                 device=device)
            t = time.monotonic()
            rows += lat.measure_model(model, name, variant, size, "registry", device, [mode], args.views, args.batch,
                                      args.runs_per, args.warmup, dtype, measures=measures.split(","),
                                      throughput_runs=args.throughput_runs)
            print(f"[{time.monotonic() - t0:6.0f} s] {name} {mode}: {time.monotonic() - t:.0f} s", flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
            lat.write_results(rows, env, Path(args.out), vars(args))
    lat.write_results(rows, env, Path(args.out), vars(args))
    print(lat.format_table(rows))
    print()
    print(table(rows))
    print(f"\n{env['gpu'] or env['cpu']}, driver {env['driver']}, torch {env['torch']}, CUDA {env['cuda']}, "
          f"mamba-ssm {env['mamba_ssm']}; {args.runs_per} runs per row after {args.warmup} warm-up.\n"
          f"Note: {lat.LAUNCH_BOUND_NOTE}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
