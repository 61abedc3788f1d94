"""Batch-1 inference scans, both directions in one call: mamba-ssm's grouped kernel against the chunked Triton scan.

    python benchmarks/bench_scan_infer.py --out scan_infer.json                  # on a GPU with mamba-ssm
    python benchmarks/bench_scan_infer.py --widths 384 --configs 16,1,2048 8,1,4096 16,2,1024

The call the bidirectional mixer makes with ``grouped_scan`` under torch.no_grad: u, delta [batch, 2E, L] (channels
[0, E) the forward direction, [E, 2E) the backward one), B, C [batch, 2, N, L], D, delta_bias, softplus, no z (the
mixer gates outside). ``cuda`` is mamba-ssm's kernel on tensors whose backward half is already flipped (the flips
the model needs for it are not timed); ``chunked`` is ops/_scan_chunked.py with ``reverse_groups=1`` on the same
tensors (it reads the backward half in reverse itself). Each is captured in a CUDA graph and replayed (how the
latency harness runs a model), the median of ``--reps`` replays of ``--inner`` calls each. Agreement: the chunked
scan against mamba-ssm on the same inputs with reverse_groups=0 (the same recurrence), the largest difference of
y relative to mamba-ssm's largest |y|. ``--configs``: CONFIG settings "BD,warps,programs[,steps]" to time after the
default (steps: 0, a step's inputs loaded per step; > 0, blocks of that many steps loaded at once; a setting's steps
apply to both layouts, the default row takes CONFIG's steps / steps_tokens). ``--layouts``:
the chunked scan's inputs channel-major (u, delta [batch, 2E, L] time innermost, B / C time innermost: the training
layout) and / or token-major (the same values as views of [batch, L, 2E] and [batch, L, 2, N] tensors: the grouped
mixer's batch-1 path since session 20, y written in that layout too).
Widths: tiny 384, small 768, base 1152 (d_inner = 2 x d_model; sessions 14-15 ran 1536 as "base", wider than it).
"""
from __future__ import annotations

import argparse
import json
import platform

import torch

from msf_scale.ops import _scan_chunked, selective_scan


def make_inputs(batch, width, length, n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    dim = 2 * width
    return dict(u=r(batch, dim, length).to(device, dtype), delta=(0.5 * r(batch, dim, length)).to(device, dtype),
                A=(-torch.rand(dim, n, generator=g) * n).to(device), B=r(batch, 2, n, length).to(device, dtype),
                C=r(batch, 2, n, length).to(device, dtype), D=r(dim).to(device), delta_bias=(r(dim) - 4).to(device))


def token_major(x: dict) -> dict:
    """The same values with u, delta as views of [batch, L, 2E] and B, C of [batch, L, 2, N] tensors."""
    tokens = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)
    groups = lambda t: t.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    return dict(x, u=tokens(x["u"]), delta=tokens(x["delta"]), B=groups(x["B"]), C=groups(x["C"]))


def graph_time(fn, reps: int, inner: int) -> float:
    """Median ms of one call, from CUDA-graph replays of ``inner`` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--widths", default="384,768,1152", help="d_inner per direction, comma-separated")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--length", type=int, default=1569, help="sequence length (8 x 14 x 14 patches + cls: 1569)")
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--layouts", default="channels", help="chunked inputs' layouts: channels, tokens or both")
    ap.add_argument("--configs", nargs="*", default=[],
                    help="BD,warps,programs[,steps] settings after the default")
    args = ap.parse_args(argv)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    default = dict(_scan_chunked.CONFIG)
    configs = [c.split(",") for c in args.configs]
    if any(len(v) not in (3, 4) for v in configs):
        ap.error("--configs: each setting is BD,warps,programs[,steps]")
    settings = [default] + [dict(default, BD=int(v[0]), warps=int(v[1]), programs=int(v[2]),
                                 steps=int(v[3]) if len(v) > 3 else default["steps"],
                                 steps_tokens=int(v[3]) if len(v) > 3 else default["steps_tokens"])
                            for v in configs]
    rows = []
    with torch.no_grad():
        for width in (int(w) for w in args.widths.split(",")):
            x = make_inputs(args.batch, width, args.length, args.d_state, dtype, dev)
            common = dict(D=x["D"], delta_bias=x["delta_bias"], delta_softplus=True)
            y_ref = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], backend="cuda", **common)
            y_new = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], backend="chunked", **common)
            rel = ((y_new.float() - y_ref.float()).abs().max() / y_ref.float().abs().max()).item()
            cuda_ms = graph_time(lambda: selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], backend="cuda",
                                                        **common), args.reps, args.inner)
            row = dict(width=width, channels=2 * width, cuda_ms=cuda_ms, agreement_rel=rel, chunked=[])
            for layout, cfg in [(lay, cfg) for lay in args.layouts.split(",") for cfg in settings]:
                x_in = x if layout == "channels" else token_major(x)
                _scan_chunked.CONFIG.update(cfg)
                y_cfg = selective_scan(x_in["u"], x_in["delta"], x_in["A"], x_in["B"], x_in["C"], backend="chunked",
                                       **common)
                rel_cfg = ((y_cfg.float() - y_ref.float()).abs().max() / y_ref.float().abs().max()).item()
                ms = graph_time(lambda: selective_scan(x_in["u"], x_in["delta"], x_in["A"], x_in["B"], x_in["C"],
                                                       backend="chunked", reverse_groups=1, **common),
                                args.reps, args.inner)
                bd, steps = _scan_chunked._block(2 * width, width), _scan_chunked.steps_per_block(x_in["u"])
                chunks = _scan_chunked.chunking(args.batch, 2 * width, args.length, bd)[0]
                row["chunked"].append(dict(layout=layout, BD=cfg["BD"], warps=cfg["warps"],
                                           programs=cfg["programs"], steps=steps, chunks=chunks, ms=ms,
                                           vs_cuda=cuda_ms / ms, agreement_rel=rel_cfg))
                print(f"width {width}: cuda {cuda_ms * 1e3:.1f} us, chunked {layout} BD {cfg['BD']} "
                      f"warps {cfg['warps']} programs {cfg['programs']} steps {steps} ({chunks} chunks) "
                      f"{ms * 1e3:.1f} us = "
                      f"{cuda_ms / ms:.2f}x cuda; agreement {rel_cfg:.2e}", flush=True)
            _scan_chunked.CONFIG.update(default)
            rows.append(row)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, host=platform.node(),
                  batch=args.batch, length=args.length, d_state=args.d_state, dtype="bfloat16", rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
