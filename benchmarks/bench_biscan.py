"""Both directions of the bidirectional scan in one call: mamba-ssm's grouped kernel against the Triton scan.

    python benchmarks/bench_biscan.py --out biscan.json                         # on a GPU with mamba-ssm
    python benchmarks/bench_biscan.py --configs 16,2,1,16,4,0 32,2,1,8,4,1       # Triton CONFIGs to try
    python benchmarks/bench_biscan.py --batch 1 --width 384 --forward-only --chunk-programs 0 1024 2048 8192
                                                      # batch-1 inference (tiny): the chunked forward, no autograd

The call the bidirectional mixer makes with ``grouped_scan``: u, delta, z [batch, 2E, L] (channels [0, E) the
forward direction, [E, 2E) the backward one), B, C [batch, 2, N, L], delta_softplus, D, delta_bias; forward +
backward of sum(y * w). ``cuda`` is mamba-ssm's kernel given the backward half already flipped (what the model
feeds it); ``triton`` is ops/_scan_triton.py with ``reverse_groups=1`` on the same tensors, which then reads the
backward half in reverse time order itself (so its numbers are those of a model that needs no flipped copies;
the flips the cuda path needs are not timed here). Also timed: forward alone. The agreement lines compare the
Triton scan with mamba-ssm on one set of inputs (reverse_groups=0, so both run the same recurrence): the largest
difference of y and of every gradient, relative to the largest value of mamba-ssm's. ``--forward-only``: the forward
under torch.no_grad (inference) only, for each ``--chunk-programs`` value (CONFIG["chunk_programs"]: below that many
programs the Triton forward splits the sequence into chunks; 0: never).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from msf_scale.ops import selective_scan
from msf_scale.ops import _scan_triton


def make_inputs(batch, width, length, n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    dim = 2 * width
    tensors = dict(u=r(batch, dim, length).to(device, dtype), delta=(0.5 * r(batch, dim, length)).to(device, dtype),
                   A=(-torch.rand(dim, n, generator=g) * n).to(device), B=r(batch, 2, n, length).to(device, dtype),
                   C=r(batch, 2, n, length).to(device, dtype), D=r(dim).to(device),
                   z=r(batch, dim, length).to(device, dtype),
                   delta_bias=(r(dim) - 4).to(device))
    for t in tensors.values():
        t.requires_grad_()
    return tensors


def timed(fn, reps):
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--width", type=int, default=768, help="E = expand x d_model per direction (small: 768)")
    ap.add_argument("--length", type=int, default=1569)
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--configs", nargs="*", default=[],
                    help="Triton CONFIGs BT,BD,warps,bwd_BD,bwd_warps,partials(0/1) to try after the default")
    ap.add_argument("--profile", action="store_true",
                    help="also print the CUDA kernels of one forward + backward of each backend (torch.profiler)")
    ap.add_argument("--forward-only", action="store_true", help="time the forward under no_grad only (inference)")
    ap.add_argument("--chunk-programs", type=int, nargs="*", default=None,
                    help="CONFIG['chunk_programs'] values to time each Triton CONFIG with (default: CONFIG's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    keys = ("BT", "BD", "warps", "bwd_BD", "bwd_warps", "partials")
    for text in args.configs:
        values = text.split(",")
        if len(values) != len(keys) or not all(v.isdigit() and int(v) > 0 for v in values[:5]) \
                or values[5] not in ("0", "1"):
            ap.error(f"--configs {text!r}: want {','.join(keys)} (positive integers, partials 0 or 1)")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (and mamba-ssm for the baseline)")
    dtype = getattr(torch, args.dtype)
    x = make_inputs(args.batch, args.width, args.length, args.d_state, dtype, "cuda")
    w = torch.randn(args.batch, 2 * args.width, args.length, device="cuda", dtype=dtype)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

    def call(backend, **kw):
        return selective_scan(*(x[k] for k in names), delta_softplus=True, backend=backend, **kw)

    def fwd_bwd(backend, **kw):
        grads = torch.autograd.grad((call(backend, **kw) * w).float().sum(), [x[k] for k in names])
        return grads

    rows = []
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "shape": [args.batch, 2 * args.width, args.length, args.d_state], "dtype": args.dtype}
    print(meta, flush=True)

    # agreement with mamba-ssm on the same recurrence (no reversal)
    with torch.no_grad():
        y_ref, y_tri = call("cuda"), call("triton", reverse_groups=0)
    g_ref, g_tri = fwd_bwd("cuda"), fwd_bwd("triton", reverse_groups=0)
    agree = {"y": ((y_tri.float() - y_ref.float()).abs().max() / y_ref.float().abs().max()).item()}
    for k, a, b in zip(names, g_tri, g_ref):
        agree["d" + k] = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
    print("agreement (max |triton - cuda| / max |cuda|):", {k: f"{v:.1e}" for k, v in agree.items()}, flush=True)

    def forward(backend, **kw):
        if args.forward_only:
            with torch.no_grad():
                return call(backend, **kw)
        return call(backend, **kw)

    cuda_fwd = timed(lambda: forward("cuda"), args.reps)
    cuda_all = None if args.forward_only else timed(lambda: fwd_bwd("cuda"), args.reps)
    print(f"cuda   grouped G=2          fwd {cuda_fwd:7.3f} ms" +
          ("" if cuda_all is None else f"   fwd+bwd {cuda_all:7.3f} ms"), flush=True)
    rows.append({"backend": "cuda", "fwd_ms": cuda_fwd, "fwd_bwd_ms": cuda_all})
    default = dict(_scan_triton.CONFIG)
    configs = [",".join(str(int(default[k])) for k in keys)] + list(args.configs)
    for text in configs:
        for chunk_programs in (args.chunk_programs if args.chunk_programs else [default["chunk_programs"]]):
            cfg = dict(zip(keys, map(int, text.split(","))))
            cfg["partials"] = bool(cfg["partials"])
            cfg["chunk_programs"] = chunk_programs
            _scan_triton.CONFIG.update(cfg)
            label = " ".join(f"{k}={int(v)}" for k, v in cfg.items())
            try:
                fwd = timed(lambda: forward("triton", reverse_groups=1), args.reps)
                both = None if args.forward_only else timed(lambda: fwd_bwd("triton", reverse_groups=1), args.reps)
            except Exception as err:   # a tile too large for registers or shared memory: report and go on
                print(f"triton {label}: failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
                continue
            print(f"triton {label}  fwd {fwd:7.3f} ms  cuda/triton fwd {cuda_fwd / fwd:.2f}x" + (
                "" if both is None else f"  bwd {both - fwd:7.3f}  fwd+bwd {both:7.3f} ms  "
                                        f"fwd+bwd {cuda_all / both:.2f}x"), flush=True)
            rows.append({"backend": "triton", **cfg, "fwd_ms": fwd, "fwd_bwd_ms": both})
    _scan_triton.CONFIG.update(default)
    if args.profile:
        for backend, kw in (("cuda", {}), ("triton", {"reverse_groups": 1})):
            fwd_bwd(backend, **kw)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                fwd_bwd(backend, **kw)
                torch.cuda.synchronize()
            print(f"\n{backend}: CUDA kernels of one forward + backward\n" +
                  prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60),
                  flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "agreement": agree, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
