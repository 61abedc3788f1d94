"""Training-step throughput, peak memory and batch-1 latency of every variant x size, side by side in one run.

    python benchmarks/bench_model.py                                   # GPU: 8 x 224 x 224, batch 32 (base 16), bf16
    python benchmarks/bench_model.py --device cpu --sizes tiny --variants msf_mamba --frames 8 --img 112 --batch 2 \
        --precision fp32 --steps 2                                      # the CPU figure of the model issue

A step is forward + backward + AdamW on random clips (no data loading). Latency: eval mode, batch 1, median of
--latency-reps calls of msf_scale.inference's runner (``--latency-mode``: a CUDA graph's replay on GPU, eager on
CPU). Prints a markdown table; --out writes JSON.

Setups compare execution choices on the same models in the same run (issue 19): ``--setup NAME:key=value,...``
(repeatable) takes model options (``grouped_scan=true``, ``fusion_backend=triton``, ...) and ``compile=true``
(torch.compile of the model) or ``compile=regional`` (accelerate's compile_regions: each block compiled on its own,
one compilation shared by all, as ``--train.compile regional`` does); the first setup is the reference, and every
row's ``x_videomamba`` is its clips/s over the reference setup's videomamba of the same size:

    python benchmarks/bench_model.py --sizes small --setup eager: --setup grouped:grouped_scan=true \
        --setup grouped_compiled:grouped_scan=true,compile=true --out /tmp/bench_model.json

Each row also gives ``first_step_s``, the first warm-up step's wall time (with a compiled setup: mostly compiling).
``--latency-reps 0`` leaves batch-1 latency out (a compiled model would compile again for eval).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

from msf_scale.inference import build_runner
from msf_scale.models import create_model


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def parse_setup(text: str) -> tuple[str, dict, bool | str]:
    """``NAME:key=value,...`` -> (name, model options, compile: False / True / "regional"); values parse as
    bool/int/float where they can."""
    name, _, spec = text.partition(":")
    options = {}
    for item in filter(None, spec.split(",")):
        key, eq, raw = item.partition("=")
        if not eq:
            raise SystemExit(f"--setup {text!r}: options look like key=value")
        value = {"true": True, "false": False}.get(raw.lower(), raw)
        for cast in (int, float):
            if isinstance(value, str):
                try:
                    value = cast(value)
                except ValueError:
                    pass
        options[key] = value
    compiled = options.pop("compile", False)
    compiled = compiled.lower() if isinstance(compiled, str) else compiled
    if not (compiled is True or compiled is False or compiled == "regional"):
        raise SystemExit(f"--setup {text!r}: compile is true, false or regional")
    return name or "eager", options, compiled


def bench_one(variant, size, args, batch, options=None, compiled=False):
    device = args.device
    torch.manual_seed(0)
    options = {"scan_backend": args.scan_backend, **(options or {})}   # a setup's scan_backend wins
    model = create_model(variant, size=size, num_classes=32, num_frames=args.frames, img_size=args.img,
                         **options).to(device)
    params = model.num_params()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    if compiled:
        torch._dynamo.reset()   # a fresh cache per model: otherwise dynamo's recompile limit sends later ones to eager
        if compiled == "regional":
            from accelerate.utils import compile_regions
            model = compile_regions(model)
        else:
            model = torch.compile(model)
    amp = (torch.autocast(device, dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext())
    x = torch.randn(batch, 3, args.frames, args.img, args.img, device=device)
    y = torch.randint(0, 32, (batch,), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with amp:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for i in range(args.warmup):
        step()
        if i == 0:
            sync(device)
            first_step_s = time.perf_counter() - t0
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    step_s = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    del opt   # its state would share the GPU with the latency runner
    row = {"variant": variant, "size": size, "batch": batch, "params_M": round(params / 1e6, 2),
           "step_ms": round(1e3 * step_s, 1), "clips_per_s": round(batch / step_s, 1),
           "peak_mem_GiB": round(peak, 2), "first_step_s": round(first_step_s, 2), "latency_b1_ms": None,
           "latency_mode": args.latency_mode}
    if args.latency_reps > 0:
        row["latency_b1_ms"] = _latency(model, x, args)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def _latency(model, x, args) -> float:
    """Median batch-1 latency (ms) of msf_scale.inference's runner in --latency-mode."""
    device = args.device
    lat = []
    # batch-1 inference as the latency harness runs it (msf_scale.inference): eager, or a CUDA graph's replay. Not
    # caught: a failed capture can leave torch's allocator mid-capture, and every later row would be wrong.
    run = build_runner(model, x[:1].clone(), mode=args.latency_mode,   # the setup says whether the scan is grouped
                       dtype=torch.bfloat16 if args.precision == "bf16" else None, grouped_scan=None)
    for i in range(args.latency_reps + 3):
        sync(device)
        t0 = time.perf_counter()
        run(x[:1])
        sync(device)
        if i >= 3:
            lat.append(time.perf_counter() - t0)
    return round(1e3 * sorted(lat)[len(lat) // 2], 2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", default="videomamba,msf_mamba,msf_mamba_plus")
    ap.add_argument("--sizes", default="tiny,small,base")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--base-batch", type=int, default=16)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--scan-backend", default="auto")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 1)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--latency-reps", type=int, default=20)
    ap.add_argument("--latency-mode", choices=("eager", "graph"), default=None,
                    help="batch-1 latency as msf_scale.inference runs it (default: graph on cuda, eager on cpu)")
    ap.add_argument("--setup", action="append", default=None,
                    help="NAME:key=value,... model options (and compile=true|regional) of one setup; repeatable "
                         "(doc above)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (the first step is timed apart: compiling, allocating)")
    setups = [parse_setup(t) for t in (args.setup or ["eager:"])]
    args.latency_mode = args.latency_mode or ("graph" if args.device == "cuda" else "eager")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = []
    print("| setup | variant | size | batch | params (M) | step (ms) | clips/s | x videomamba | peak mem (GiB) | "
          f"first step (s) | batch-1 latency, {args.latency_mode} (ms) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    reference: dict[str, float] = {}   # size -> the first setup's videomamba clips/s
    for size in args.sizes.split(","):
        for name, options, compiled in setups:
            for variant in args.variants.split(","):
                batch = args.base_batch if size == "base" else args.batch
                r = {"setup": name, "options": options, "compiled": compiled,
                     **bench_one(variant, size, args, batch, options, compiled)}
                if variant == "videomamba" and size not in reference:
                    reference[size] = r["clips_per_s"]
                r["x_videomamba"] = round(r["clips_per_s"] / reference[size], 3) if size in reference else None
                rows.append(r)
                print(f"| {name} | {variant} | {size} | {batch} | {r['params_M']} | {r['step_ms']} | "
                      f"{r['clips_per_s']} | {r['x_videomamba']} | {r['peak_mem_GiB']} | {r['first_step_s']} | "
                      f"{r['latency_b1_ms']} |",
                      flush=True)
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "input": f"{args.frames}x{args.img}x{args.img}", "precision": args.precision,
            "command": " ".join(["python", "benchmarks/bench_model.py", *(argv if argv is not None else sys.argv[1:])])}
    print(json.dumps(meta))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
