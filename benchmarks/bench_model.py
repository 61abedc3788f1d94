"""Training-step throughput, peak memory and batch-1 latency of every variant x size, side by side in one run.

    python benchmarks/bench_model.py                                   # GPU: 8 x 224 x 224, batch 32 (base 16), bf16
    python benchmarks/bench_model.py --device cpu --sizes tiny --variants msf_mamba --frames 8 --img 112 --batch 2 \
        --precision fp32 --steps 2                                      # the CPU figure of the model issue

A step is forward + backward + AdamW on random clips (no data loading). Latency: eval mode, batch 1, median of
--latency-reps calls. Prints a markdown table; --out writes JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from msf_scale.models import create_model


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def bench_one(variant, size, args, batch):
    device = args.device
    torch.manual_seed(0)
    model = create_model(variant, size=size, num_classes=32, num_frames=args.frames, img_size=args.img,
                         scan_backend=args.scan_backend).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
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

    for _ in range(args.warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    step_s = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    model.eval()
    x1 = x[:1]
    lat = []
    with torch.no_grad(), amp:
        for i in range(args.latency_reps + 3):
            sync(device)
            t0 = time.perf_counter()
            model(x1)
            sync(device)
            if i >= 3:
                lat.append(time.perf_counter() - t0)
    row = {"variant": variant, "size": size, "batch": batch, "params_M": round(model.num_params() / 1e6, 2),
           "step_ms": round(1e3 * step_s, 1), "clips_per_s": round(batch / step_s, 1),
           "peak_mem_GiB": round(peak, 2), "latency_b1_ms": round(1e3 * sorted(lat)[len(lat) // 2], 2)}
    del model, opt
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


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
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--latency-reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows = []
    print("| variant | size | batch | params (M) | step (ms) | clips/s | peak mem (GiB) | batch-1 latency (ms) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes.split(","):
        for variant in args.variants.split(","):
            batch = args.base_batch if size == "base" else args.batch
            r = bench_one(variant, size, args, batch)
            rows.append(r)
            print(f"| {variant} | {size} | {batch} | {r['params_M']} | {r['step_ms']} | {r['clips_per_s']} | "
                  f"{r['peak_mem_GiB']} | {r['latency_b1_ms']} |", flush=True)
    meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "input": f"{args.frames}x{args.img}x{args.img}", "precision": args.precision}
    print(json.dumps(meta))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
