"""The ``msf-scale data`` command: ``synth`` (synthetic shards), ``pack`` (real clips from a CSV) and ``convert``
(iMiGUE / SMG annotations -> the packer's CSV).

``add_data_parser(subparsers)`` is wired by ``msf_scale/cli.py``; each subcommand sets ``func(args) -> int``.
Synthetic defaults are not repeated here: a flag left out keeps ``SynthConfig``'s default.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import fields

from .synthetic import PRESETS, SynthConfig

# flag -> (SynthConfig field, type, help). Defaults come from SynthConfig.
_SYNTH_FLAGS = {
    "--classes": ("num_classes", int, "number of classes (motion patterns, at most 12)"),
    "--train-per-class": ("train_per_class", int, "train clips per class"),
    "--test-per-class": ("test_per_class", int, "test clips per class (held-out subjects)"),
    "--frames": ("num_frames", int, "frames per clip"),
    "--size": ("size", int, "frame height and width, px (even)"),
    "--seed": ("seed", int, "random seed (same seed, same bytes)"),
    "--subjects": ("subjects", int, "distinct subjects (appearances)"),
    "--test-subjects": ("test_subjects", int, "subjects held out for the test split"),
    "--val-subjects": ("val_subjects", int, "subjects held out for a val split (0 = no val split)"),
    "--val-per-class": ("val_per_class", int, "val clips per class (default: as --test-per-class)"),
    "--motion-px": ("motion_px", float, "class signal: object displacement per frame, px"),
    "--object-px": ("object_px", float, "object diameter, px"),
    "--drift-px": ("drift_px", float, "distractor: max global camera drift per frame, px"),
    "--distractors": ("distractors", int, "distractor objects moving at random"),
    "--noise-std": ("noise_std", float, "Gaussian pixel noise std (0-255 scale)"),
    "--texture": ("texture", float, "background texture contrast (0-255 scale)"),
    "--gesture-px": ("gesture_px", float, "body scene (micro): the hand's gesture amplitude over the clip, px"),
    "--gesture-min-frac": ("gesture_min_frac", float, "body scene: the gesture fills at least this part of the clip"),
    "--body-px": ("body_px", float, "body scene: the body's height, px"),
    "--sway-px": ("sway_px", float, "body scene: the body's (and hand's) sway amplitude, px"),
    "--hand-contrast": ("hand_contrast", float, "body scene: the hand's contrast, 0 (body colour) to 1"),
    "--format": ("format", str, "clip storage: npy (exact) or mp4 (H.264)"),
    "--shard-size": ("shard_size", int, "clips per shard"),
}


def _synth(args: argparse.Namespace) -> int:
    from .schema import read_dataset_info
    from .synthetic import synthesize

    overrides = {field: getattr(args, field) for field, _, _ in _SYNTH_FLAGS.values()
                 if getattr(args, field) is not None}
    t0 = time.perf_counter()
    try:
        root = synthesize(args.out, preset=args.preset, **overrides)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    info = read_dataset_info(root)
    counts = ", ".join(f"{s} {v.num_samples}" for s, v in info.splits.items())
    print(f"wrote {info.name} ({counts} clips, {info.num_classes} classes, {info.num_frames} x {info.height} x "
          f"{info.width}, {info.format}) to {root} in {time.perf_counter() - t0:.1f} s")
    return 0


def _pack(args: argparse.Namespace) -> int:
    from .packer import pack

    try:
        pack(args.videos, args.annotations, args.out, frames=args.frames, size=args.size,
             shard_size=args.shard_size, workers=args.workers, fmt=args.format, seed=args.seed,
             flip_ok=not args.no_flip, name=args.name)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}")
        return 2
    return 0


def _convert(args: argparse.Namespace) -> int:
    from msf_scale.config import UserError

    from .convert import convert

    try:
        n = convert(args.dataset, args.annotations, args.out, video=args.video, class_names=args.class_names,
                    test_subjects=args.test_subjects)
    except UserError as e:
        print(f"error: {e}")
        return 2
    print(f"wrote {n} segments to {args.out}: pack them with msf-scale data pack --videos DIR --annotations "
          f"{args.out} --out data/{args.dataset} --frames 32 --size 224 --format mp4")
    return 0


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``data {synth,pack,convert}`` to a CLI's subparsers; returns the ``data`` parser."""
    data = subparsers.add_parser("data", help="make shard datasets (synthetic, or packed from real clips)")
    sub = data.add_subparsers(dest="data_command", required=True)

    defaults = {f.name: f.default for f in fields(SynthConfig)}
    synth = sub.add_parser("synth", help="generate the synthetic micro-gesture dataset",
                           description="Synthetic micro-gestures: the class is the motion of a small object.")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="named dataset: demo (the default, easy) or micro (the fine-motion benchmark: a 10-15 px "
                            "hand gesture, 32 x 112 x 112); the flags below override its values")
    for flag, (field, typ, text) in _SYNTH_FLAGS.items():
        kw = {"choices": ["npy", "mp4"]} if field == "format" else {}
        synth.add_argument(flag, dest=field, type=typ, default=None, help=f"{text} (default {defaults[field]}; a --preset may set it)",
                           **kw)
    synth.set_defaults(func=_synth)

    pk = sub.add_parser("pack", help="pack real clips listed in a CSV into shards",
                        description="CSV columns: path (relative to --videos), label (name or 0-based index), "
                                    "optional subject and split (train/val/test).")
    pk.add_argument("--videos", required=True, help="directory holding the clips")
    pk.add_argument("--annotations", required=True, help="CSV: path,label[,subject][,split]")
    pk.add_argument("--out", required=True, help="output directory (must not hold a dataset)")
    pk.add_argument("--frames", type=int, default=None, help="sample T evenly spaced frames (default: keep all)")
    pk.add_argument("--size", type=int, default=None, help="resize the short side to S px (default: keep)")
    pk.add_argument("--shard-size", type=int, default=256, help="clips per shard (default 256)")
    pk.add_argument("--workers", type=int, default=1, help="decode/encode processes (default 1)")
    pk.add_argument("--format", choices=["mp4", "npy"], default="mp4", help="clip storage (default mp4)")
    pk.add_argument("--seed", type=int, default=0, help="seed of the subject split and shard order (default 0)")
    pk.add_argument("--no-flip", action="store_true", help="mark classes as left/right-specific (no flip)")
    pk.add_argument("--name", default=None, help="dataset name (default: the --out directory name)")
    pk.set_defaults(func=_pack)

    from .convert import SMG_TEST_SUBJECTS
    cv = sub.add_parser("convert", help="iMiGUE / SMG annotations -> the CSV that `data pack` reads",
                        description="One CSV row per annotated segment (path,label,subject,split,start,end), from "
                                    "the releases' layouts: iMiGUE <id>/<id>_label.csv under train/validate folders, "
                                    "SMG SampleNNNN/SampleNNNN_finelabels.csv. See docs/DATA.md.")
    cv.add_argument("dataset", choices=["imigue", "smg"])
    cv.add_argument("--annotations", required=True, help="the release's annotation root")
    cv.add_argument("--out", required=True, help="CSV to write")
    cv.add_argument("--video", default=None, help="video path template, {sample} = annotation folder name, relative "
                                                  "to pack's --videos (imigue: {sample}.mp4; smg: "
                                                  "{sample}/{sample}_color.mp4)")
    cv.add_argument("--class-names", default=None, help="file of class names, one per line in id order "
                                                        "(default: 0-based indices)")
    cv.add_argument("--test-subjects", default=SMG_TEST_SUBJECTS,
                    help=f"smg: participants of the test split (default {SMG_TEST_SUBJECTS}, their protocol)")
    cv.set_defaults(func=_convert)
    return data
