"""Training throughput per model size: a fixed number of steps with DeepSpeed ZeRO-2 and bf16 on GPU(s).

    python benchmarks/bench_train.py                                  # tiny, small, base on 1 GPU, 60 steps
    python benchmarks/bench_train.py --sizes base --gpus 8 --batch-size 32 --steps 100 --data /data/imigue
    python benchmarks/bench_train.py --variant msf_mamba_plus --out reports/bench_train_plus.json

Each size runs `accelerate launch msf_scale/train.py` in a fresh process (so peak memory is its own) and
reads the run's metrics.jsonl: clips/s, MFU, TFLOP/s per device, data-wait share (means over the log lines
after `--warmup` steps) and peak memory. FLOPs follow fvcore's convention (1 MAC = 1 FLOP forward;
training = 3 x forward, x 2 FLOPs per MAC for MFU against the bf16 dense peak). Prints a Markdown table and
writes JSON. Without `--data` it trains on the synthetic default (32 px clips upsampled to --img-size, so the
loader's resize cost is included, not real decoding).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_size(args: argparse.Namespace, size: str, out_dir: Path) -> dict:
    run = out_dir / f"{args.variant}_{size}"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(args.gpus),
           *(["--multi_gpu"] if args.gpus > 1 else []), "--main_process_port", "0",
           str(REPO / "msf_scale" / "train.py"), "--size", size, "--variant", args.variant,
           "--dist.zero_stage", str(args.zero_stage), "--train.precision", "bf16",
           "--train.batch_size", str(args.batch_size), "--max-steps", str(args.steps),
           "--model.num_frames", str(args.num_frames), "--model.img_size", str(args.img_size),
           "--data.num_workers", str(args.num_workers), "--data.num_clips", "1", "--data.num_crops", "1",
           "--train.eval_every", "0", "--train.ckpt_every", "0", "--log.log_every", str(args.log_every),
           "--log.progress", "false", "--output-dir", str(run), *(["--data", args.data] if args.data else []),
           *args.extra]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        return {"size": size, "error": (proc.stdout + proc.stderr)[-3000:], "wall_s": wall}
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steady = [r for r in rows if "clips_per_s" in r and r["step"] > args.warmup] or [r for r in rows if "clips_per_s" in r]
    meta = json.loads((run / "run_meta.json").read_text())

    def mean(key: str) -> float | None:
        vals = [r[key] for r in steady if r.get(key) is not None]
        return statistics.fmean(vals) if vals else None

    return {"size": size, "variant": args.variant, "engine": meta["engine"], "zero_stage": meta["zero_stage"],
            "gpus": meta["world_size"], "global_batch": meta["global_batch"], "steps": args.steps,
            "input": f"{args.num_frames}x{args.img_size}x{args.img_size}", "clips_per_s": mean("clips_per_s"),
            "clips_per_s_per_device": mean("clips_per_s_per_device"), "tflops_per_device": mean("tflops_per_device"),
            "mfu": mean("mfu"), "data_wait_share": mean("data_wait_share"),
            "peak_mem_gb": max(r["peak_mem_gb"] for r in steady), "forward_gmacs_per_clip":
            meta["forward_macs_per_clip"] / 1e9, "wall_s": round(wall, 1)}


def table(results: list[dict]) -> str:
    head = "| size | GPUs | global batch | clips/s | clips/s/GPU | TFLOP/s/GPU | MFU | data wait | peak mem GB |"
    lines = [head, "|" + "---|" * 9]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['size']} | failed: see JSON |" + " |" * 7)
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.2f}%"
        lines.append(f"| {r['size']} | {r['gpus']} | {r['global_batch']} | {r['clips_per_s']:.1f} | "
                     f"{r['clips_per_s_per_device']:.1f} | {r['tflops_per_device']:.2f} | {mfu} | "
                     f"{100 * r['data_wait_share']:.1f}% | {r['peak_mem_gb']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "small", "base"])
    p.add_argument("--variant", default="msf_mamba")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32, help="clips per GPU")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=20, help="steps left out of the means")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--data", default=None)
    p.add_argument("--out", default="reports/bench_train.json")
    p.add_argument("--run-root", default="runs/bench_train")
    p.add_argument("extra", nargs="*", help="more train.py overrides after --, e.g. -- --model.grad_checkpointing true")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    results = []
    for size in args.sizes:
        results.append(run_size(args, size, REPO / args.run_root))
        print(json.dumps(results[-1]), flush=True)
    print(table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "flops_convention": "1 MAC = 1 FLOP (fvcore); MFU uses "
                               "6 x MACs per trained clip against the bf16 dense peak"}, indent=1))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
