"""Decoded clips/s per CPU core of the data loader, for mp4 and npy clips, at 8 x 224 x 224 and 16 x 112 x 112.

    python benchmarks/bench_loader.py                       # all four cases, 64 distinct clips, 256 per pass
    python benchmarks/bench_loader.py --workers 4 --out reports/bench_loader.json

For each (geometry, format) it writes a synthetic dataset (the generator at that size; noise std 3 keeps H.264
honest), then measures, in this order:
  decode   one process, one thread: tar read + decode of every clip (npy: np.load; mp4: PyAV, all T frames)
  train/1  the training loader in the main process (num_workers=0, torch and PyAV on one thread): tar read,
           temporal sampling, decode, random resized crop back to S, normalisation, batching (batch 8), over an
           epoch of --epoch-clips (resampled from the --clips distinct ones; shuffle buffer 16)
  train/W  the same loader with W worker processes (each forked anew per pass, start-up included): total
           clips/s, and per worker
Each figure is the best of --repeats passes after one warm-up pass. Results print as a table and go to --out.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

if importlib.util.find_spec("msf_scale") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msf_scale.data import build_train_loader, read_dataset_info, synthesize
from msf_scale.data.schema import load_npy
from msf_scale.data.streams import ErrorLog, read_samples
from msf_scale.data.video import decode_mp4


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _best(fn, repeats: int) -> float:
    fn()  # warm-up: page cache, imports, allocator
    return min(_timed(fn) for _ in range(repeats))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_case(frames: int, size: int, fmt: str, clips: int, epoch_clips: int, workers: int, repeats: int,
               tmp: Path) -> dict:
    root = tmp / f"{fmt}-{frames}x{size}"
    t0 = time.perf_counter()
    synthesize(root, num_frames=frames, size=size, format=fmt, train_per_class=math.ceil(clips / 8),
               test_per_class=1, shard_size=32, object_px=size / 5, motion_px=size / 16)
    gen_s = time.perf_counter() - t0
    info = read_dataset_info(root)
    urls = info.shard_paths("train")
    n = info.splits["train"].num_samples
    shard_bytes = sum(os.path.getsize(u) for u in urls)

    def decode_all():
        for s in read_samples(iter(urls), ErrorLog()):
            video = load_npy(s["npy"]) if fmt == "npy" else decode_mp4(s["mp4"], threads=1)
            assert video.shape == (frames, size, size, 3)

    def loader_pass(w: int):
        loader = build_train_loader(root, batch_size=8, num_frames=frames, img_size=size, num_workers=w,
                                    epoch_samples=epoch_clips, shuffle_buffer=16)
        return lambda: sum(len(y) for _, y in loader)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        decode_s = _best(decode_all, repeats)
        train1_s = _best(loader_pass(0), repeats)
    finally:
        torch.set_num_threads(threads)
    trainw_s = _best(loader_pass(workers), repeats) if workers > 0 else float("nan")
    clips_per_batch_round = 8 * math.ceil(epoch_clips / 8)  # the loader delivers full batches
    return {"format": fmt, "frames": frames, "size": size, "clips": n, "bytes_per_clip": shard_bytes / n,
            "generate_s": gen_s, "decode_clips_per_s": n / decode_s,
            "train_1core_clips_per_s": clips_per_batch_round / train1_s,
            "workers": workers, "train_workers_clips_per_s": clips_per_batch_round / trainw_s,
            "train_per_worker_clips_per_s": clips_per_batch_round / trainw_s / max(workers, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=64, help="distinct clips per case (default 64)")
    p.add_argument("--epoch-clips", type=int, default=256, help="clips per loader pass (default 256)")
    p.add_argument("--geometries", nargs="+", default=["8x224", "16x112"], help="TxS cases (default 8x224 16x112)")
    p.add_argument("--formats", nargs="+", default=["npy", "mp4"], choices=["npy", "mp4"])
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the multi-process line")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per figure (best kept)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    env = {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "loadavg_before": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_loader-") as tmp:
        for geo in args.geometries:
            frames, size = (int(x) for x in geo.lower().split("x"))
            for fmt in args.formats:
                r = bench_case(frames, size, fmt, args.clips, args.epoch_clips, args.workers, args.repeats,
                               Path(tmp))
                results.append(r)
                print(f"{fmt:4s} {frames:2d}x{size}x{size}: {r['bytes_per_clip'] / 1e3:8.0f} kB/clip | decode "
                      f"{r['decode_clips_per_s']:7.1f} clips/s/core | train loader {r['train_1core_clips_per_s']:6.1f}"
                      f" clips/s/core | {args.workers} workers {r['train_workers_clips_per_s']:6.1f} clips/s "
                      f"({r['train_per_worker_clips_per_s']:.1f}/worker)", flush=True)
    env["loadavg_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(json.dumps(env))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"env": env, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
