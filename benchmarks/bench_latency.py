"""The latency table of every variant x size (GPU): eager, CUDA-graph replay and torch.compile.

    python benchmarks/bench_latency.py --out OUT [--frames 8 --img-size 224 --views 6 --batch 64]
        [--modes eager,graph,compile] [--measures clip,video,throughput] [--compile-measures clip]
        [--budget-s 400] [--compile-cap-s 180] [--compile-reserve-s 0] [--row-cap-s 20]
        [--models a,b,...] [--runs-per 50] [--throughput-runs 20] [--warmup 10] [--fusion-config k=v,...]

Order (msf_scale.latency.plan_table): every eager and graph row first, measure by measure (the batch-1 clip rows
of all models, then video, then throughput), then the torch.compile rows, shallowest model first. One progress
line per row as it finishes (flushed, with the elapsed time), and OUT/latency.csv + OUT/latency.json rewritten
atomically after every row: every planned row is in them from the start, marked "not run" until it runs, so a
run killed at any point keeps every finished row and names the rest.

``--budget-s`` is a hard wall-clock budget for the whole table, from the start of this script: a row predicted
(from the measured time of the same kind of row on the other models, scaled by depth or MACs) to overrun what is
left is not started and is written as "skipped (budget)"; a row that runs past it is stopped by an alarm
("stopped (budget)"). A torch.compile row is also stopped after ``--compile-cap-s``; ``--compile-reserve-s`` keeps
that many seconds of the budget for the compile rows. ``--row-cap-s`` bounds each row's warm-up + timed calls
(a batch-64 forward of a base model costs ~1 s on a GPU): fewer timed runs when the calls are slow, never
fewer than 5 (the ``runs`` column says how many). Models are timed with random weights (latency needs no
training). Exit 0, or 1 when a row raised (its error is in the files), 143 on SIGTERM (files written first).
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

T_START = time.monotonic()   # the budget counts from here (torch's import included)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from msf_scale import latency as lat  # noqa: E402
from msf_scale.models import create_model, list_models  # noqa: E402

# size-major: a budget cut loses the base models of every variant, not one variant's every size
DEFAULT_MODELS = [f"{v}_{s}" for s in ("tiny", "small", "base") for v in ("videomamba", "msf_mamba", "msf_mamba_plus")]
VARIANT_ORDER = ("videomamba", "msf_mamba", "msf_mamba_plus")


class Terminated(BaseException):
    """SIGTERM (a wall-clock kill from outside): unwinds through run_table, which writes what it has."""


def table(rows: list[lat.Row]) -> str:
    """model x size grid: 'eager / graph / compile' batch-1 clip medians (ms), as issue 15's table."""
    cell: dict[tuple[str, str], dict[str, str]] = {}
    for r in rows:
        if r.measure == "clip":
            cell.setdefault((r.variant, r.size), {})[r.mode] = "—" if r.median_ms is None else f"{r.median_ms:.2f}"
    variants = sorted({v for v, _ in cell}, key=lambda v: VARIANT_ORDER.index(v) if v in VARIANT_ORDER else 99)
    modes = [m for m in lat.MODES if any(m in c for c in cell.values())]
    out = [f"batch-1 latency per clip, ms ({' / '.join(modes)}; — = not timed, see the rows above):", "",
           "| size | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for size in ("tiny", "small", "base"):
        out.append(f"| {size} | " + " | ".join(" / ".join(cell.get((v, size), {}).get(m, "—") for m in modes)
                                              for v in variants) + " |")
    return "\n".join(out)


def model_costs(names: list[str], args) -> dict[str, tuple[float, float]]:
    """name -> (depth, analytic MACs per clip), from meta-device models (no memory, ~0.1 s each): the scale
    factors of the step-time predictions."""
    costs = {}
    for name in names:
        try:
            m = create_model(name, num_classes=args.num_classes, num_frames=args.frames, img_size=args.img_size,
                             device="meta")
            costs[name] = (float(getattr(m.cfg, "depth", 1) or 1), float(m.flops_per_clip()))
        except Exception:   # noqa: BLE001 - no estimate for this model: its steps are predicted unscaled
            pass
    return costs


def apply_fusion_config(parser: argparse.ArgumentParser, text: str) -> None:
    """Set ops/_fusion_triton.CONFIG from 'key=value,...' (an A/B of a kernel setting inside the models); unknown
    keys and malformed values end the command in one line."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_fusion_infer import parse_point

    try:
        from msf_scale.ops import _fusion_triton as ft
    except ImportError as e:
        parser.error(f"--fusion-config needs triton ({e})")
    try:
        point = parse_point(text)
    except ValueError as e:
        parser.error(f"--fusion-config: values are integers, '/'-separated integers or none ({e})")
    unknown = sorted(set(point) - set(ft.CONFIG))
    if unknown:
        parser.error(f"--fusion-config: not CONFIG settings of ops/_fusion_triton.py: {', '.join(unknown)}")
    ft.CONFIG.update(point)


def main(argv: list[str] | None = None, log=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=32)
    p.add_argument("--views", type=int, default=6)
    p.add_argument("--batch", type=int, default=64, help="batch of the throughput rows (0: none)")
    p.add_argument("--modes", default="eager,graph,compile")
    p.add_argument("--measures", default="clip,video,throughput", help="rows of the eager and graph modes")
    p.add_argument("--compile-measures", default="clip", help="rows of the compile mode")
    p.add_argument("--runs-per", type=int, default=50)
    p.add_argument("--throughput-runs", type=int, default=20, help="timed runs of the large-batch row")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=None,
                   help="hard wall-clock budget of the whole table (s, from the script's start)")
    p.add_argument("--compile-cap-s", type=float, default=180.0, help="a compile row is stopped after this (s)")
    p.add_argument("--compile-reserve-s", type=float, default=0.0,
                   help="seconds of the budget that eager/graph rows leave to the compile rows")
    p.add_argument("--row-cap-s", type=float, default=20.0,
                   help="bound on one row's warm-up + timed calls (s; fewer runs, >= 5, when calls are slow)")
    p.add_argument("--fusion-config", default=None,
                   help="settings of the fused fusion op's CONFIG (ops/_fusion_triton.py) for this run, "
                        "'key=value,...' as bench_fusion_infer.py --points takes them (recorded in latency.json)")
    args = p.parse_args(argv)
    log = log or (lambda s: print(s, flush=True))
    if args.fusion_config:
        apply_fusion_config(p, args.fusion_config)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    modes = args.modes.split(",")
    if set(modes) - set(lat.MODES):
        p.error(f"--modes: expected some of {','.join(lat.MODES)}")
    if "graph" in modes and device.type != "cuda":
        p.error("--modes graph needs CUDA; on CPU use --modes eager or eager,compile")
    names = args.models.split(",")
    unknown = [n for n in names if n not in list_models()]
    if unknown:
        p.error(f"unknown models {unknown}; registered: {list_models()}")
    costs = model_costs(names, args)
    steps = lat.plan_table(names, modes, args.measures.split(","), args.compile_measures.split(","), args.views,
                           args.batch, depth={n: c[0] for n, c in costs.items()})
    budget = lat.Budget(args.budget_s, costs, start=T_START if argv is None else None, row_cap_s=args.row_cap_s)
    env = lat.environment(device)

    def make_model(name: str):
        return create_model(name, num_classes=args.num_classes, num_frames=args.frames, img_size=args.img_size,
                            device=device)

    def on_term(signum, frame):
        raise Terminated()
    previous = signal.signal(signal.SIGTERM, on_term)
    rc = 0
    try:
        rows, failures = lat.run_table(
            steps, make_model, device, args.runs_per, args.warmup, dtype, Path(args.out), env, vars(args),
            budget=budget, compile_cap_s=args.compile_cap_s, compile_reserve_s=args.compile_reserve_s,
            row_cap_s=args.row_cap_s, throughput_runs=args.throughput_runs,
            input_=f"3 x {args.frames} x {args.img_size} x {args.img_size}", log=log)
        rc = 1 if failures else 0
    except Terminated:
        log(f"[{budget.elapsed():7.1f} s] SIGTERM: stopped; finished rows are in {args.out}")
        rows, rc = [lat.Row(**r) for r in lat.read_results(Path(args.out))], 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    log("")
    log(lat.format_table(rows))
    log("")
    log(table(rows))
    log(f"\n{env['gpu'] or env['cpu']}, driver {env['driver']}, torch {env['torch']}, CUDA {env['cuda']}, "
        f"mamba-ssm {env['mamba_ssm']}; {args.runs_per} runs per row after up to {args.warmup} warm-up "
        f"(--row-cap-s {args.row_cap_s:g}); {budget.elapsed():.0f} s in all.\n{lat.choices_line(env)}.\n"
        f"Note: {lat.LAUNCH_BOUND_NOTE}.\n"
        f"-> {Path(args.out) / 'latency.csv'}, {Path(args.out) / 'latency.json'}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
