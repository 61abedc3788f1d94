"""`msf-scale predict VIDEO... --ckpt RUN`: top-k classes with probabilities for video files.

    msf-scale predict clip1.mp4 clip2.mp4 --ckpt runs/msf_mamba_tiny [--topk 5] [--ema] [--json out.json]
    msf-scale predict long.mp4 --ckpt runs/msf_mamba_tiny/best --start 1520 --end 1583   # one annotated segment

Each video goes through the run's own test-time pipeline, as `msf-scale eval` sees a test clip: num_clips
segment-centred clips of num_frames frames x num_crops square crops of the short side, resized to img_size,
normalised with the recorded mean/std; softmax averaged over the views. Geometry and views come from the export's
model_config.json (`--num-clips` / `--num-crops` override the views). Class names come from the export (indices
for an export that records none). Files: anything PyAV decodes (mp4, avi, mkv, webm...), or .npy (uint8 T x H x W x 3).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from msf_scale.config import ConfigError, UserError, UserPathError


def read_clip(path: str | Path, start: int | None = None, end: int | None = None) -> np.ndarray:
    """uint8 T x H x W x 3 frames of a video file (frames [start, end) when given) or of a .npy array."""
    p = Path(path)
    if not p.is_file():
        raise UserPathError(f"{p} does not exist")
    if p.suffix == ".npy":
        video = np.load(p)
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"{p}: a .npy clip must be uint8 T x H x W x 3, got {video.dtype} {video.shape}")
        return video[slice(start, end)]
    from msf_scale.data.video import read_video_file
    return read_video_file(p, start=start, end=end)[0]


def clip_views(video: np.ndarray, num_frames: int, img_size: int, num_clips: int, num_crops: int) -> torch.Tensor:
    """[V, 3, T, S, S] normalised views, exactly as the eval loader builds them (EvalStream._decode_into)."""
    from msf_scale.data import transforms as tf

    n = video.shape[0]
    idx = [i for c in range(num_clips) for i in tf.eval_indices(n, num_frames, c, num_clips)]
    frames = video[idx]
    return tf.eval_views([frames[c * num_frames:(c + 1) * num_frames] for c in range(num_clips)], img_size, num_crops)


@torch.no_grad()
def predict_probs(model: torch.nn.Module, views: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Class probabilities of one video: the softmax averaged over its views."""
    logits = model(views.to(device))
    return logits.float().softmax(-1).mean(0).cpu()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="msf-scale predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", nargs="+", help="video files (or .npy uint8 T x H x W x 3)")
    p.add_argument("--ckpt", required=True, help="run directory, its best/, or a model.safetensors")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--ema", action="store_true", help="use model_ema.safetensors")
    p.add_argument("--num-clips", type=int, default=None, help="default: the export's test views")
    p.add_argument("--num-crops", type=int, default=None, help="default: the export's test views")
    p.add_argument("--start", type=int, default=None, help="first frame of the segment to classify")
    p.add_argument("--end", type=int, default=None, help="end frame (exclusive) of the segment")
    p.add_argument("--json", default=None, help="also write the predictions to this JSON file")
    args = p.parse_args(argv)
    try:
        return _main(args)
    except UserError as e:
        print(f"msf-scale predict: error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    from msf_scale.export import load_model, read_model_config

    ckpt = Path(args.ckpt)
    if not (ckpt.parent if ckpt.suffix == ".safetensors" else ckpt).joinpath("model_config.json").is_file():
        raise UserPathError(f"{ckpt}: no model_config.json; pass a finished run directory, its best/, or an "
                            "msf-scale import output")
    if args.topk < 1:
        raise ConfigError("--topk must be >= 1")
    meta = read_model_config(ckpt)
    views_rec = meta.get("preprocessing", {})
    t, s, n = meta["config"]["num_frames"], meta["config"]["img_size"], meta["config"]["num_classes"]
    names = meta.get("class_names") or [str(i) for i in range(n)]
    clips, crops = args.num_clips or views_rec.get("num_clips", 1), args.num_crops or views_rec.get("num_crops", 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(ckpt, ema=args.ema, device=device)
    results, failed = [], 0
    for video_path in args.videos:
        try:
            video = read_clip(video_path, args.start, args.end)
        except ValueError as e:   # unreadable / truncated: say so, go on with the others
            print(f"{video_path}: cannot read ({e})", file=sys.stderr)
            failed += 1
            continue
        probs = predict_probs(model, clip_views(video, t, s, clips, crops), device)
        top = probs.topk(min(args.topk, n))
        preds = [{"class": names[i], "index": int(i), "prob": float(pr)} for pr, i in zip(*top)]
        results.append({"video": str(video_path), "frames": int(video.shape[0]), "views": clips * crops,
                        "top": preds})
        print(f"{video_path}: " + "  ".join(f"{r['class']} {r['prob']:.3f}" for r in preds), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
