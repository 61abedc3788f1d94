"""Selective-scan backends side by side (forward + backward), on CPU or GPU, at video-shaped sizes.

    python benchmarks/bench_scan.py                      # CPU: chunked torch scan vs the per-step loop
    python benchmarks/bench_scan.py --device cuda --backends cuda,torch --batch 32 --lengths 1569,3137,6273

Prints one line per (length, backend) with milliseconds and the ratio to the first backend, plus JSON with --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from msf_scale.ops.selective_scan import selective_scan


def time_call(fn, warmup: int, reps: int, device: str) -> float:
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]   # median


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backends", default="torch,ref")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dim", type=int, default=384, help="scan width (expand x d): 384 for tiny")
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--lengths", default="393,1568")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=3)
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
        base = None
        for backend in args.backends.split(","):
            def step():
                y = selective_scan(u, delta, A, B, C, D, z, bias, True, backend=backend)
                y.float().sum().backward()
            ms = 1e3 * time_call(step, 1, args.reps, args.device)
            base = base or ms
            row = {"length": length, "backend": backend, "ms_fwd_bwd": round(ms, 3), "ratio_to_first": round(ms / base, 3),
                   "batch": args.batch, "dim": args.dim, "d_state": args.d_state, "dtype": args.dtype}
            rows.append(row)
            print(f"L={length:5d}  {backend:6s} {ms:10.2f} ms  x{ms / base:.2f} of {args.backends.split(',')[0]}")
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
