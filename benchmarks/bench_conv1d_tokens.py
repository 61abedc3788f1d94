"""The token-major mixer's conv1d + silu, both directions (batch-1 inference), CUDA-graph replayed, side by side.

    python benchmarks/bench_conv1d_tokens.py --out DIR                          # tiny / small / base widths
    python benchmarks/bench_conv1d_tokens.py --out DIR --points "BL=64,BE=64;BL=16,BE=128,warps=2"

Rows per width (d_inner E; x is the [1, L, E] slice of the input projection's [1, L, 2E] output, as the mixer passes
it): ``torch`` is the torch form (two shifted convs, the concatenation, the silu) compiled by Inductor (what the
mixer ran before session 20: two kernels), ``triton[...]`` ops/_conv1d_triton.conv1d_both_silu at its CONFIG and at
each ``--points`` setting (BL positions and BE channels a program, warps). ``bytes_us``: the time its bytes alone
take at ``--bandwidth`` GB/s (one read of x, one write of the output), the floor to compare with. Error: max |out -
ref| / max |ref| against the torch form in float64 on the same bf16 inputs. Writes DIR/bench_conv1d_tokens.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_scan_infer import graph_time  # noqa: E402  (CUDA-graph replay timing, ms)
from msf_scale.ops import _conv1d_triton  # noqa: E402
from msf_scale.ops import causal_conv1d as cc  # noqa: E402


def graph_us(fn, reps: int, inner: int = 20) -> float:
    return graph_time(fn, reps, inner) * 1e3


def parse_point(text: str) -> dict:
    point = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in _conv1d_triton.CONFIG:
            raise SystemExit(f"--points: unknown setting {key!r}; expected one of {sorted(_conv1d_triton.CONFIG)}")
        if not value.isdigit():
            raise SystemExit(f"--points: {key} needs a positive integer, got {value!r}")
        point[key] = int(value)
    return point


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--widths", default="384,768,1152", help="d_inner, comma-separated (tiny / small / base)")
    ap.add_argument("--length", type=int, default=1569)
    ap.add_argument("--points", default="", help="CONFIG settings to time after the default, ';'-separated")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--bandwidth", type=float, default=3000.0, help="GB/s for the bytes floor (H100 SXM ~3350)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_conv1d_tokens.py needs a CUDA GPU")
    default = dict(_conv1d_triton.CONFIG)
    points = [default] + [dict(default, **parse_point(p)) for p in args.points.split(";") if p]
    compiled = torch.compile(cc.conv1d_both_silu_torch, dynamic=False)
    rows = []
    with torch.no_grad():
        for width in (int(w) for w in args.widths.split(",")):
            torch.manual_seed(0)
            xz = torch.randn(1, args.length, 2 * width, device="cuda", dtype=torch.bfloat16)
            x = xz[..., :width]
            weight = torch.randn(2 * width, 1, 4, device="cuda") * 0.5
            bias = torch.randn(2 * width, device="cuda")
            taps = weight[:, 0].t().contiguous()                 # [K, 2E], as the mixer passes them
            ref = cc.conv1d_both_silu_torch(x.double(), taps.double(), bias.double())
            err = lambda out: ((out.double() - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
            floor = (x.numel() + 2 * x.numel()) * 2 / (args.bandwidth * 1e3)   # bytes / (GB/s) in us
            row = dict(width=width, bytes_us=floor, results=[])
            us = graph_us(lambda: compiled(x, taps, bias), args.reps)
            row["results"].append(dict(name="torch (Inductor)", us=us, error=err(compiled(x, taps, bias))))
            try:
                for point in points:
                    _conv1d_triton.CONFIG.update(point)
                    out = _conv1d_triton.conv1d_both_silu(x, taps, bias)
                    us = graph_us(lambda: _conv1d_triton.conv1d_both_silu(x, taps, bias), args.reps)
                    label = "triton[" + ",".join(f"{k}={v}" for k, v in point.items()) + "]"
                    row["results"].append(dict(name=label, us=us, error=err(out), **point))
            finally:
                _conv1d_triton.CONFIG.update(default)
            rows.append(row)
            for r in row["results"]:
                print(f"width {width}: {r['name']:36s} {r['us']:7.2f} us ({r['us'] / floor:.1f}x the bytes' "
                      f"{floor:.2f} us)  error {r['error']:.2e}", flush=True)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, host=platform.node(),
                  length=args.length, dtype="bfloat16", rows=rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_conv1d_tokens.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
