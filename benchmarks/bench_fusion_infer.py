"""MCFM + ASWM at inference batch sizes: each fusion path's forward, CUDA-graph replayed, side by side (issue 19).

    python benchmarks/bench_fusion_infer.py --out DIR        # batch 1 at the tiny / small / base widths

At batch 1 a forward is bound by launches and by how many SMs a kernel fills, not by FLOPs, so every candidate is
captured in one CUDA graph (as msf_scale.inference replays the model) and the graph's replay is timed. Rows:
    conv            StateFusion(backend="conv"): a depthwise conv3d per scale, the ASWM in torch (`auto` at batch 1
                    before session 12; still for 3x3x3 alone)
    gemm            StateFusion(backend="gemm"): block-Toeplitz bands as batched GEMMs, the ASWM in that layout
    fft             StateFusion(backend="fft"): products in the frequency domain (cuFFT), the ASWM on their output;
                    fft[spectra]: the same with the kernels' spectra computed once, as a cached inference would
    triton+torch    the triton backend's scales in one launch (its forward-only op), the ASWM in torch
    triton[...]     ops/_fusion_triton.multiscale_fusion_triton (scales and ASWM fused) at launch settings from its
                    CONFIG: g = aswm_group (channels per program), f = fwd_frames (frames per program), s = fwd_shared,
                    st / u = fwd_loop_stages / fwd_unroll (the window loop's pipelining / unrolling), p =
                    logit_partials (ASWM logits per channel group, summed in torch, instead of atomics), k =
                    fwd_stack (the scales' bands side by side, one product per window row), a = alpha_kernel (the
                    ASWM weights in one launch), fwd = the forward's num_warps / num_stages, alpha_tile = _alpha's
                    (slices, positions) per load; unnamed settings are BATCH1_FORWARD's at batch 1 (frame blocks of
                    4, 4 warps in 16-bit, _alpha, stacked bands up to STACK_MAX_CHANNELS; session 18)
Each row's error is the max |out - ref| / max |ref| against the float64 ``ref`` backend on the same rounded inputs.
Writes DIR/bench_fusion_infer.json and .md; prints the table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from msf_scale.models.blocks import StateFusion  # noqa: E402
from msf_scale.ops import state_fusion  # noqa: E402

DEFAULT_SHAPES = "1,192,8,14,14;1,384,8,14,14;1,576,8,14,14"


def graph_ms(fn, reps: int, inner: int = 20) -> float:
    """Median over ``reps`` of the mean replay time (ms) of a CUDA graph holding one call of fn."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def sweep_points(groups, frames, shared):
    return [{"aswm_group": g, "fwd_frames": f, "fwd_shared": s} for g, f, s in itertools.product(groups, frames, shared)]


def parse_point(text: str) -> dict:
    """'aswm_group=1,fwd_unroll=2,fwd=8/3' -> {"aswm_group": 1, "fwd_unroll": 2, "fwd": (8, 3)} (integers,
    '/'-separated tuples of them, as CONFIG's (num_warps, num_stages) pairs; 'none' for None)."""
    point = {}
    for item in filter(str.strip, text.split(",")):   # empty items (a trailing comma) are skipped
        key, _, value = item.partition("=")
        value = value.strip()
        point[key.strip()] = (None if value.lower() == "none" else tuple(int(v) for v in value.split("/"))
                              if "/" in value else int(value))
    return point


def point_label(point: dict, name: str = "triton") -> str:
    short = {"aswm_group": "g", "fwd_frames": "f", "fwd_shared": "s", "fwd_loop_stages": "st", "fwd_unroll": "u",
             "logit_partials": "p", "fwd_stack": "k", "alpha_kernel": "a"}
    def shown(v):
        return "/".join(map(str, v)) if isinstance(v, tuple) else str(int(v)) if isinstance(v, bool) else str(v)
    text = ",".join(f"{short.get(k, k)}={shown(v)}" for k, v in point.items())
    return f"{name}[{text}]"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="B,C,T,H,W;...")
    ap.add_argument("--scales", default="3,5,7")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--groups", default="1,4,16", help="aswm_group values swept for the fused triton row")
    ap.add_argument("--frames", default="1,2,8", help="fwd_frames values swept")
    ap.add_argument("--shared", default="1", help="fwd_shared values swept (0, 1)")
    ap.add_argument("--points", default=None,
                    help="instead of the sweep: CONFIG settings, 'key=value,...' separated by ';' (e.g. "
                         "'aswm_group=1,fwd_shared=0,fwd_unroll=2;logit_partials=1,fwd=8/3')")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (CUDA-graph replay)")
    from msf_scale.ops import _fusion_triton as ft

    dev, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    scales = tuple(int(k) for k in args.scales.split(","))
    if args.points:
        try:
            points = [parse_point(p) for p in args.points.split(";") if p.strip()]
        except ValueError as e:
            ap.error(f"--points: values are integers, '/'-separated integers or none ({e})")
        unknown = sorted({k for p in points for k in p} - set(ft.CONFIG))
        if unknown:
            ap.error(f"--points: not CONFIG settings of ops/_fusion_triton.py: {', '.join(unknown)}")
    else:
        points = sweep_points([int(v) for v in args.groups.split(",")], [int(v) for v in args.frames.split(",")],
                              [bool(int(v)) for v in args.shared.split(",")])
    t0 = time.perf_counter()
    rows = []
    for shape_s in args.shapes.split(";"):
        b, c, t, hh, ww = map(int, shape_s.split(","))
        torch.manual_seed(0)
        aswm = len(scales) > 1   # one scale: no ASWM (msf_mamba), the fused rows do not apply
        fusion = StateFusion(c, scales, theta=0.7, theta_learnable=False, use_aswm=aswm, init="uniform",
                             device=dev, dtype=dtype).eval()
        if aswm:
            torch.nn.init.normal_(fusion.aswm.weight, std=c ** -0.5)
        h = torch.randn(b, c, t, hh, ww, device=dev, dtype=dtype)
        with torch.no_grad():
            ref64 = StateFusion(c, scales, theta=0.7, theta_learnable=False, use_aswm=aswm, backend="ref",
                                device=dev, dtype=torch.float64).eval()
            ref64.load_state_dict({k: v.double() for k, v in fusion.state_dict().items()})
            want = ref64(h.double())

        def candidate(name, point=None):
            if name == "triton":
                def fn():
                    return ft.multiscale_fusion_triton(h, list(fusion.kernels), fusion.theta, fusion.aswm.weight,
                                                       fusion.aswm.bias)
            elif name == "fft[spectra]":   # the fft backend with the kernels' spectra computed once (inference)
                from msf_scale.ops._fusion_fft import grid_sizes, kernel_spectra, multiscale_fusion_fft
                with torch.no_grad():
                    spectra = kernel_spectra(list(fusion.kernels), fusion.theta, grid_sizes(h.shape, scales),
                                             torch.float32)

                def fn():
                    return multiscale_fusion_fft(h, list(fusion.kernels), fusion.theta, fusion.aswm.weight,
                                                 fusion.aswm.bias, spectra=spectra)
            elif name == "triton+torch":   # the scales by the triton backend, the ASWM in torch (not the fused op)
                def fn():
                    fused = state_fusion(h, list(fusion.kernels), fusion.theta, backend="triton")
                    return fusion._weighted(fused, h.dtype) if aswm else fused[0]
            else:
                def fn():
                    fusion.backend = name
                    return fusion(h)
            return fn

        cands = [("conv", None), ("gemm", None), ("triton+torch", None)] + [("fft", None)]
        cands += [("fft[spectra]", None)] if aswm else []
        # the fused op's settings apply to the fused rows; one window (no ASWM): to the triton backend's own launch
        cands += [("triton", {})] + [("triton", p) for p in points] if aswm else [("triton+torch", p) for p in points]
        for name, point in cands:
            saved = dict(ft.CONFIG)
            ft.CONFIG.update(point or {})
            label = name if not point else point_label(point, name)
            try:
                fn = candidate(name)
                with torch.no_grad():
                    err = ((fn().double() - want).abs().max() / want.abs().max()).item()
                    ms = graph_ms(lambda: fn(), args.reps)
                row = {"shape": [b, c, t, hh, ww], "path": label, "graph_ms": round(ms, 4), "rel_err": err}
            except Exception as e:   # a setting that does not compile or fit is a finding, not a crash
                row = {"shape": [b, c, t, hh, ww], "path": label, "error": repr(e)[:200]}
            finally:
                ft.CONFIG.clear()
                ft.CONFIG.update(saved)
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "host": platform.node(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "scales": list(scales), "dtype": args.dtype,
            "statistic": f"median of {args.reps} x mean of 20 CUDA-graph replays, ms",
            "wall_s": round(time.perf_counter() - t0, 1)}
    lines = [f"MCFM + ASWM (scales {args.scales}) forward, CUDA-graph replay, {meta['device']}, {args.dtype}", "",
             "| shape | path | graph ms | x conv | rel err vs float64 |", "|---|---|---:|---:|---:|"]
    conv = {tuple(r["shape"]): r["graph_ms"] for r in rows if r["path"] == "conv" and "graph_ms" in r}
    for r in rows:
        if "graph_ms" in r:
            base = conv.get(tuple(r["shape"]))
            ratio = f"{base / r['graph_ms']:.2f}x" if base else "-"
            lines.append(f"| {tuple(r['shape'])} | {r['path']} | {r['graph_ms']:.4f} | {ratio} | {r['rel_err']:.1e} |")
        else:
            lines.append(f"| {tuple(r['shape'])} | {r['path']} | {r['error']} | | |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_fusion_infer.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "bench_fusion_infer.md"), "w") as f:
        f.write(table + "\n")
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
