"""BiMamba forward + backward: the two-call path (one scan per direction) against ``grouped_scan`` (both
directions in one conv, batched projections and one grouped scan call), on the same weights, interleaved.

    python benchmarks/bench_bimamba.py --out runs/bench_bimamba      # CUDA: bf16 autocast, tiny/small/base widths
    python benchmarks/bench_bimamba.py --device cpu --widths 32 --batch 2 --length 64 --reps 3 --out /tmp/bb

Per width (d_model; batch 32, 16 at base's 576, x L = 8*14*14 tokens): the median ms of each path (they take turns
within every rep, so a slow spell hits both), grouped / separate, peak memory on CUDA, and the largest relative
output difference as a sanity check. Writes DIR/bench_bimamba.json and DIR/bench_bimamba.md.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from msf_scale.models.blocks import BiMamba

PATHS = ("separate", "grouped")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def time_interleaved(steps: dict, warmup: int, reps: int, device: str) -> dict:
    """Median ms per call of each step, the steps taking turns within every rep; CUDA events on the GPU (no sync
    between reps), the wall clock on CPU."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                times[name].append((start, end))
            else:
                t0 = time.perf_counter()
                step()
                times[name].append(1e3 * (time.perf_counter() - t0))
    if device == "cuda":
        torch.cuda.synchronize()
        times = {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in times.items()}
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def bench_width(width: int, batch: int, args) -> dict:
    torch.manual_seed(0)
    separate = BiMamba(width, scan_backend=args.backend, device=args.device)
    separate.reset_parameters()
    grouped = copy.deepcopy(separate)
    grouped.grouped_scan = True
    mixers = dict(zip(PATHS, (separate, grouped)))
    x = torch.randn(batch, args.length, width, device=args.device, requires_grad=True)
    gy = torch.randn_like(x)
    amp = (lambda: torch.autocast(args.device, dtype=torch.bfloat16)) if args.autocast == "bfloat16" \
        else contextlib.nullcontext

    def step(mixer):
        mixer.zero_grad(set_to_none=True)
        x.grad = None
        with amp():
            y = mixer(x)
        y.backward(gy.to(y.dtype))
        return y.detach()

    with torch.no_grad(), amp():
        out = {name: m(x).float() for name, m in mixers.items()}
    diff = ((out["grouped"] - out["separate"]).abs().max() / out["separate"].abs().max()).item()
    ms = time_interleaved({name: (lambda m=m: step(m)) for name, m in mixers.items()}, args.warmup, args.reps,
                          args.device)
    peak = {}
    if args.device == "cuda":
        for name, m in mixers.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step(m)
            torch.cuda.synchronize()
            peak[name] = torch.cuda.max_memory_allocated() / 2 ** 20
    row = {"d_model": width, "batch": batch, "length": args.length, "ms_separate": round(ms["separate"], 3),
           "ms_grouped": round(ms["grouped"], 3), "grouped_over_separate": round(ms["grouped"] / ms["separate"], 3),
           "peak_mib": {k: round(v, 1) for k, v in peak.items()}, "max_rel_out_diff": diff}
    print(f"d={width:4d} b={batch:3d} L={args.length}: separate {ms['separate']:8.2f} ms, grouped "
          f"{ms['grouped']:8.2f} ms, ratio {row['grouped_over_separate']:.3f} (rel out diff {diff:.1e})")
    return row


def to_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# BiMamba forward + backward: separate vs grouped scan ({meta['date']})", "",
             f"- device: {meta['device']}; torch {meta['torch']}, mamba-ssm {meta['mamba_ssm']}; "
             f"autocast {meta['autocast']}, scan backend {meta['backend']}; median of {meta['reps']} reps "
             f"after {meta['warmup']} warm-up", f"- command: `{meta['command']}`", "",
             "| d_model | batch x L | separate ms | grouped ms | grouped / separate | peak MiB sep / grp |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        peak = " / ".join(f"{r['peak_mib'][p]:.0f}" for p in PATHS) if r["peak_mib"] else "-"
        lines.append(f"| {r['d_model']} | {r['batch']} x {r['length']} | {r['ms_separate']:.2f} | "
                     f"{r['ms_grouped']:.2f} | {r['grouped_over_separate']:.3f} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--widths", default="192,384,576", help="d_model values: tiny, small, base")
    ap.add_argument("--batch", type=int, default=None, help="default 32, 16 for widths >= 576")
    ap.add_argument("--length", type=int, default=8 * 14 * 14)
    ap.add_argument("--autocast", choices=("bfloat16", "none"), default=None, help="default bfloat16 on CUDA")
    ap.add_argument("--backend", default="auto", help="selective_scan backend of both paths")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None, help="directory for bench_bimamba.json and .md")
    args = ap.parse_args(argv)
    args.autocast = args.autocast or ("bfloat16" if args.device == "cuda" else "none")
    rows = [bench_width(w, args.batch or (16 if w >= 576 else 32), args) for w in map(int, args.widths.split(","))]
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} "
            "threads)", "torch": torch.__version__, "mamba_ssm": _version("mamba_ssm"),
            "date": time.strftime("%Y-%m-%d %H:%M"), "autocast": args.autocast, "backend": args.backend,
            "reps": args.reps, "warmup": args.warmup,
            "command": shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["main", *argv])}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_bimamba.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (out / "bench_bimamba.md").write_text(to_markdown(meta, rows))
    return rows


if __name__ == "__main__":
    main()
