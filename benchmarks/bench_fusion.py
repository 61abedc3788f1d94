"""The MCFM + ASWM fusion, backends side by side in one run: forward and forward + backward on CUDA (issue 19).

    python benchmarks/bench_fusion.py --out DIR          # (32, 384, 8, 14, 14) bf16, scales 3,5,7 + ASWM

What each row times is the whole StateFusion (every scale, the ASWM's 1x1 conv, softmax and weighted sum) and,
for forward + backward, every gradient (input, kernels, theta, ASWM weight and bias) via torch.autograd.grad:
    conv            StateFusion(backend="conv"): cuDNN / PyTorch depthwise conv3d per scale, ASWM in torch
    ref             StateFusion(backend="ref"): the equation term by term (conv3d minus theta * H * sum)
    triton+torch    the triton backend for the scales (one launch), ASWM in torch (what StateFusion runs today
                    with backend="triton")
    triton          ops/_fusion_triton.multiscale_fusion_triton: scales and ASWM fused
    gemm            StateFusion(backend="gemm"): block-Toeplitz bands as batched cuBLAS GEMMs, ASWM in that layout
    igemm           StateFusion(backend="igemm"): the same products as implicit GEMMs in Triton, ASWM in torch
    fft             StateFusion(backend="fft"): products in the frequency domain (cuFFT / pocketfft), the ASWM on their
                    float32 output, gradients by autograd
    fft+compile     ops/_fusion_fft.multiscale_fusion_fft under torch.compile (Inductor fuses the crop, the ASWM and the
                    products' gradients around the transforms, which stay library calls)
CUDA events around each call, the backends taking turns within every rep (a slow spell hits all alike); the
median of --reps (>= 50) after --warmup. Prints a Markdown table with each row's ratio to `conv` and writes
DIR/bench_fusion.json and DIR/bench_fusion.md. The first (compiling) call of the Triton kernels is timed apart.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from msf_scale.models.blocks import StateFusion  # noqa: E402


class _Timer:
    """CUDA events on a GPU; perf_counter on CPU (only for smoke runs: --device cpu with TRITON_INTERPRET=1)."""

    def __init__(self, dev):
        self.cuda = dev.type == "cuda"

    def __call__(self, fn) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t0)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for bench_fusion.json / .md")
    ap.add_argument("--shape", default="32,384,8,14,14", help="B,C,T,H,W")
    ap.add_argument("--scales", default="3,5,7")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--backends", default="conv,ref,triton+torch,triton,gemm,igemm")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-sweep", action="store_true", help="skip the launch-settings sweeps of the Triton backends")
    ap.add_argument("--sweep-budget-s", type=float, default=75.0,
                    help="start no further sweep point after this many seconds of the run")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only for a smoke run of the script itself")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_fusion.py needs a CUDA GPU")
    if args.reps < 50 and args.device == "cuda":
        raise SystemExit("--reps must be >= 50")
    torch.backends.cudnn.benchmark = False
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    timer = _Timer(dev)
    b, c, t, hh, ww = map(int, args.shape.split(","))
    scales = tuple(map(int, args.scales.split(",")))
    backends = args.backends.split(",")
    t_start = time.perf_counter()

    torch.manual_seed(0)
    fusion = StateFusion(c, scales, theta=0.7, theta_learnable=True, use_aswm=True, init="uniform",
                         device=dev, dtype=dtype)
    torch.nn.init.normal_(fusion.aswm.weight, std=c ** -0.5)
    h = torch.randn(b, c, t, hh, ww, device=dev, dtype=dtype, requires_grad=True)
    gout = torch.randn_like(h)
    params = [h, *fusion.kernels, fusion.theta, fusion.aswm.weight, fusion.aswm.bias]

    compiled_fft = None

    def forward(name):
        nonlocal compiled_fft
        if name == "fft+compile":
            from msf_scale.ops._fusion_fft import multiscale_fusion_fft
            compiled_fft = compiled_fft or torch.compile(multiscale_fusion_fft, fullgraph=True)
            return compiled_fft(h, list(fusion.kernels), fusion.theta, fusion.aswm.weight, fusion.aswm.bias)
        if name == "triton":
            from msf_scale.ops._fusion_triton import multiscale_fusion_triton
            return multiscale_fusion_triton(h, list(fusion.kernels), fusion.theta, fusion.aswm.weight,
                                            fusion.aswm.bias)
        fusion.backend = "triton" if name == "triton+torch" else name
        return fusion(h)

    def fwd(name):
        with torch.no_grad():
            forward(name)

    def fwd_bwd(name):
        torch.autograd.grad(forward(name), params, gout)

    # first calls (Triton compiles here), and agreement with conv in this run
    compile_s, outs = {}, {}
    for name in backends:
        sync()
        t0 = time.perf_counter()
        out = forward(name)
        grads = torch.autograd.grad(out, params, gout)
        sync()
        compile_s[name] = time.perf_counter() - t0
        outs[name] = (out.detach().float(), [g.float() for g in grads])
    base_out, base_grads = outs[backends[0]]

    def rel(a, b_):
        return ((a - b_).abs().max() / b_.abs().max().clamp_min(1e-30)).item()

    # theta's gradient apart: a sum that cancels (bf16 can round the reference's to 0), so it is taken against the
    # larger of the two, and the other gradients' maximum stays comparable with earlier runs
    i_theta = 1 + len(scales)
    agree = {name: {"out": rel(o, base_out),
                    "grads_max": max(rel(g, gb) for i, (g, gb) in enumerate(zip(gs, base_grads)) if i != i_theta),
                    "theta": (abs(gs[i_theta] - base_grads[i_theta]) / torch.maximum(
                        gs[i_theta].abs(), base_grads[i_theta].abs()).clamp_min(1e-30)).item()}
             for name, (o, gs) in outs.items()}
    del outs

    results = {}
    for mode, step in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        for name in backends:
            for _ in range(args.warmup):
                step(name)
        sync()
        times = {name: [] for name in backends}
        for _ in range(args.reps):
            for name in backends:
                times[name].append(timer(lambda: step(name)))
        for name in backends:
            results.setdefault(name, {})[mode] = statistics.median(times[name])

    def write(sweep, final=True):
        """Rows, meta and table of this run (and the sweep so far) into --out; printed when final."""
        ref_name = "conv" if "conv" in backends else backends[0]
        rows = []
        for name in backends:
            r = results[name]
            rows.append({"backend": name, "fwd_ms": round(r["fwd"], 4), "fwd_bwd_ms": round(r["fwd_bwd"], 4),
                         f"speedup_vs_{ref_name}_fwd": round(results[ref_name]["fwd"] / r["fwd"], 2),
                         f"speedup_vs_{ref_name}_fwd_bwd": round(results[ref_name]["fwd_bwd"] / r["fwd_bwd"], 2),
                         "first_call_s": round(compile_s[name], 2),
                         f"rel_diff_vs_{backends[0]}_out": agree[name]["out"],
                         f"rel_diff_vs_{backends[0]}_grads_max": agree[name]["grads_max"],
                         f"rel_diff_vs_{backends[0]}_theta": agree[name]["theta"]})
        try:
            import triton
            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        clock = "CUDA events" if dev.type == "cuda" else "perf_counter, a CPU smoke run"
        meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "triton": triton_version, "host": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "shape": [b, c, t, hh, ww], "scales": list(scales), "dtype": args.dtype, "aswm": True,
                "reps": args.reps, "warmup": args.warmup, "statistic": f"median of {clock} times, ms",
                "wall_s": round(time.perf_counter() - t_start, 1)}
        lines = [f"MCFM + ASWM (scales {','.join(map(str, scales))}) at {tuple(meta['shape'])} {args.dtype}, "
                 f"{meta['device']}, median of {args.reps} ({clock})", "",
                 f"| backend | fwd ms | fwd+bwd ms | x {ref_name} (fwd) | x {ref_name} (fwd+bwd) | rel diff vs "
                 f"{backends[0]} (out / grads but theta / theta) |", "|---|---:|---:|---:|---:|---|"]
        for r in rows:
            lines.append(f"| {r['backend']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                         f"{r[f'speedup_vs_{ref_name}_fwd']:.1f}x | {r[f'speedup_vs_{ref_name}_fwd_bwd']:.1f}x | "
                         f"{r[f'rel_diff_vs_{backends[0]}_out']:.1e} / {r[f'rel_diff_vs_{backends[0]}_grads_max']:.1e} / "
                         f"{r[f'rel_diff_vs_{backends[0]}_theta']:.1e} |")
        if sweep:
            lines += ["", "Triton launch settings (the module's CONFIG: ops/_fusion_triton's (warps, stages) per kernel, "
                      "ops/_fusion_igemm's tiles), one point at a time, the rest at their defaults:", "",
                      "| backend | setting | fwd+bwd ms |", "|---|---|---:|"]
            for r in sweep:
                setting = ", ".join(f"{k}={v}" for k, v in r.items()
                                    if k not in ("backend", "fwd_bwd_ms", "first_call_s", "error"))
                lines.append(f"| {r['backend']} | {setting} | {r.get('fwd_bwd_ms', r.get('error'))} |")
        table = "\n".join(lines)
        if final:
            print(table)
        os.makedirs(args.out, exist_ok=True)
        doc = {"meta": meta, "rows": rows, "sweep": sweep}
        with open(os.path.join(args.out, "bench_fusion.json"), "w") as f:
            json.dump(doc, f, indent=1)
        with open(os.path.join(args.out, "bench_fusion.md"), "w") as f:
            f.write(table + "\n")
        if final:
            print(f"wrote {args.out}/bench_fusion.json ({meta['wall_s']} s)")
        return doc

    def run_sweep(name, config, points):
        """fwd + bwd of backend `name` with each point's settings in `config` (the module's dict), restored after."""
        defaults, found = dict(config), []
        for point in points:
            if time.perf_counter() - t_start > args.sweep_budget_s:
                break
            config.update(point)
            row = {"backend": name, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in point.items()}}
            try:
                t0 = time.perf_counter()
                fwd_bwd(name)
                sync()
                first = time.perf_counter() - t0
                for _ in range(args.warmup):
                    fwd_bwd(name)
                ms = statistics.median(timer(lambda: fwd_bwd(name)) for _ in range(args.reps))
                found.append(dict(row, fwd_bwd_ms=round(ms, 4), first_call_s=round(first, 2)))
            except Exception as e:   # a setting that does not compile or fit is a finding, not a crash
                found.append(dict(row, error=repr(e)[:200]))
            finally:
                config.clear()
                config.update(defaults)
            print(f"sweep {name} {point}: {found[-1].get('fwd_bwd_ms', found[-1].get('error'))}", flush=True)
        return found

    # launch settings of the Triton kernels, one kernel (or one tile shape) varied at a time; the backends' timings
    # are written first, so a run stopped during the sweep keeps them
    sweep = []
    write(sweep, final=False)
    if "triton" in backends and not args.no_sweep:
        from msf_scale.ops import _fusion_triton as ft
        points = [{"fwd": cfg} for cfg in ((4, 2), (4, 3), (8, 2), (8, 3))]
        points += [{"fwd": cfg, "fwd_shared": True} for cfg in ((4, 3), (8, 2), (8, 3))]
        points += [{"aswm_group": cg} for cg in (4, 8, 32)]
        points += [{"bwd": cfg, "bwd_batch": bb} for cfg, bb in (((4, 2), 1), ((4, 3), 1), ((8, 3), 1), ((4, 3), 2),
                                                                  ((8, 2), 2), ((8, 3), 2), ((8, 3), 4))]
        sweep += run_sweep("triton", ft.CONFIG, points)
    if "igemm" in backends and not args.no_sweep:
        from msf_scale.ops import _fusion_igemm as fi
        # tiles without spills by ptxas's count for sm_90 at this shape (bf16), the defaults aside
        points = [dict(flat=True, BM=bm, BK=bk, warps=w, stages=st) for bm, bk, w, st in (
            (64, 32, 8, 2), (64, 32, 8, 3), (64, 16, 4, 3), (128, 32, 8, 3))]
        points += [dict(BR=br, grad_warps=w, grad_programs=gp) for br, w, gp in (
            (16, 4, 4096), (16, 8, 4096), (32, 8, 16384))]
        points += [dict(BM=bm, BK=bk, warps=w, stages=st) for bm, bk, w, st in (
            (64, 16, 4, 2), (32, 32, 4, 2), (64, 32, 8, 3))]
        sweep += run_sweep("igemm", fi.CONFIG, points)

    return write(sweep)


if __name__ == "__main__":
    main()
