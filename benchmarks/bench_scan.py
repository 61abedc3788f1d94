"""Selective-scan backends side by side (forward + backward), on CPU or GPU, at video-shaped sizes.

    python benchmarks/bench_scan.py                      # CPU: chunked torch scan vs the per-step loop
    python benchmarks/bench_scan.py --device cuda --backends cuda,torch --batch 32 --lengths 1569,3137,6273

Prints one line per (length, backend): the median milliseconds of a forward + backward (the backends take turns
within each rep, so a slow spell of a shared machine hits them alike) and the ratio to the first backend; JSON with
--out.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from msf_scale.ops import selective_scan


def time_interleaved(fns: dict, warmup: int, reps: int, device: str) -> dict:
    """Median seconds per call of each fn, the fns taking turns within every rep: on a noisy machine a slow spell
    then hits all backends alike, so their ratios stay meaningful."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", default="torch,ref")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dim", type=int, default=384, help="scan width (expand x d): 384 for tiny")
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--lengths", default="393,1568")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows = []
    for length in map(int, args.lengths.split(",")):
        g = torch.Generator().manual_seed(0)
        mk = lambda *s: torch.randn(*s, generator=g).to(args.device, dtype)
        u, delta, z = (mk(args.batch, args.dim, length).requires_grad_() for _ in range(3))
        A = -torch.rand(args.dim, args.d_state, generator=g).add(0.5).to(args.device).requires_grad_()
        B, C = (mk(args.batch, args.d_state, length).requires_grad_() for _ in range(2))
        D = torch.ones(args.dim, device=args.device, requires_grad=True)
        bias = torch.zeros(args.dim, device=args.device, requires_grad=True)
        backends = args.backends.split(",")

        def step(backend):
            y = selective_scan(u, delta, A, B, C, D, z, bias, True, backend=backend)
            y.float().sum().backward()
        median = time_interleaved({b: (lambda b=b: step(b)) for b in backends}, 1, args.reps, args.device)
        base = 1e3 * median[backends[0]]
        for backend in backends:
            ms = 1e3 * median[backend]
            row = {"length": length, "backend": backend, "ms_fwd_bwd": round(ms, 3), "ratio_to_first": round(ms / base, 3),
                   "batch": args.batch, "dim": args.dim, "d_state": args.d_state, "dtype": args.dtype}
            rows.append(row)
            print(f"L={length:5d}  {backend:6s} {ms:10.2f} ms  x{ms / base:.3f} of {backends[0]}"
                  f"  ({base / ms:.1f}x faster)")
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
