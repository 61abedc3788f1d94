"""Pack real video clips listed in a CSV into the shard dataset (``msf-scale data pack``).

Input: ``--videos DIR`` and a CSV with columns ``path`` (relative to DIR) and ``label`` (class name or index),
optional ``subject``, ``split`` (train/val/test) and ``start``/``end`` (a segment of a longer video, in frames,
end exclusive: datasets annotated as segments of long recordings pack without cutting files first). Without
``split``, subjects are split (seeded) into train and test, never sharing a subject. Clips are decoded with PyAV, optionally sampled to T frames and resized (short
side), and stored as H.264 mp4 or exact npy. Decoding and encoding run in a process pool; shards are written in
a seeded shuffled order by the parent, so the output is the same for any number of workers.

A bad row (empty label, unknown path, unreadable, truncated or zero-frame clip, bad split value) is printed,
counted and written to ``rejected.csv``; it never stops the run and is never silently dropped.
"""
from __future__ import annotations

import csv
import multiprocessing
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .schema import DatasetInfo, ShardSink, make_sample, npy_bytes, write_dataset_info

TEST_FRACTION = 0.2  # share of subjects held out for test when the CSV has no split column
REJECTED_CSV = "rejected.csv"


@dataclass
class PackResult:
    info: DatasetInfo
    packed: int
    rejected: int
    rejected_csv: Path


@dataclass
class _Row:
    line: int  # line number in the CSV (the header is line 1)
    path: str
    label: str
    subject: str
    split: str
    start: str = ""  # frame index, as written in the CSV ("" = clip start)
    end: str = ""  # exclusive frame index ("" = clip end)


def _read_rows(csv_path: Path) -> tuple[list[_Row], bool]:
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip().lower() for c in reader.fieldnames or []]
        if "path" not in cols or "label" not in cols:
            raise ValueError(f"{csv_path} needs the columns 'path' and 'label' (optional 'subject', 'split'); "
                             f"found {reader.fieldnames}")
        reader.fieldnames = cols
        rows = [_Row(i + 2, (r.get("path") or "").strip(), (r.get("label") or "").strip(),
                     (r.get("subject") or "").strip(), (r.get("split") or "").strip().lower(),
                     (r.get("start") or "").strip(), (r.get("end") or "").strip())
                for i, r in enumerate(reader)]
    return rows, "split" in cols


def _class_names(labels: list[str]) -> tuple[list[str], bool]:
    """Class names, and whether labels are indices: all-integer labels are 0-based indices, else names (sorted)."""
    if labels and all(re.fullmatch(r"\d+", x) for x in labels):
        return [f"class_{i}" for i in range(max(int(x) for x in labels) + 1)], True
    return sorted(set(labels)), False


def _subject_split(subjects: list[str], seed: int, test_fraction: float) -> dict[str, str]:
    uniq = sorted(set(subjects))
    order = np.random.default_rng([seed, 31]).permutation(len(uniq))
    n_test = max(1, round(test_fraction * len(uniq))) if len(uniq) > 1 else 0
    return {uniq[j]: ("test" if k < n_test else "train") for k, j in enumerate(order)}


def _segment(row: _Row) -> tuple[int | None, int | None] | None:
    """(start, end) of a row, or None when they are not valid frame indices."""
    try:
        start = int(row.start) if row.start else None
        end = int(row.end) if row.end else None
    except ValueError:
        return None
    if (start is not None and start < 0) or (end is not None and end <= (start or 0)):
        return None
    return start, end


def _encode_clip(job: tuple[str, int | None, int | None, str, int | None, int | None]
                 ) -> tuple[bytes, dict[str, Any]] | str:
    """Worker: decode, sample, resize and encode one clip; a string is the reason it was rejected."""
    from .video import encode_mp4, read_video_file, sample_indices

    path, frames, size, fmt, start, end = job
    try:
        video, probe = read_video_file(path, short_side=size, start=start, end=end)
        fps = probe.fps
        if frames is not None:
            video = video[sample_indices(len(video), frames)]
            fps = probe.fps * frames / probe.frames
        if fmt == "mp4" and (video.shape[1] % 2 or video.shape[2] % 2):  # yuv420p: crop to even sizes
            video = video[:, : video.shape[1] // 2 * 2, : video.shape[2] // 2 * 2]
        data = encode_mp4(video, fps=fps) if fmt == "mp4" else npy_bytes(video)
    except Exception as e:  # noqa: BLE001 - every failure becomes a rejection reason
        return str(e) if isinstance(e, ValueError) else f"unreadable: {type(e).__name__}: {e}"
    meta = {"num_frames": int(video.shape[0]), "fps": round(fps, 4), "height": int(video.shape[1]),
            "width": int(video.shape[2]), "source_frames": probe.frames}
    return data, meta


def _one(values: set) -> Any:
    """The common value, or None when clips differ."""
    return next(iter(values)) if len(values) == 1 else None


def pack(videos: str | os.PathLike, annotations: str | os.PathLike, out: str | os.PathLike, *,
         frames: int | None = None, size: int | None = None, shard_size: int = 256, workers: int = 1,
         fmt: str = "mp4", seed: int = 0, flip_ok: bool = True, name: str | None = None,
         test_fraction: float = TEST_FRACTION, progress: bool = True) -> PackResult:
    """Pack the clips of ``annotations`` into shards under ``out``; see the module docstring."""
    from tqdm import tqdm

    videos, annotations, out = Path(videos), Path(annotations), Path(out)
    if not videos.is_dir():
        raise FileNotFoundError(f"--videos {videos} is not a directory")
    if not annotations.is_file():
        raise FileNotFoundError(f"--annotations {annotations} not found")
    if fmt not in ("mp4", "npy"):
        raise ValueError(f"format must be 'mp4' or 'npy', got {fmt!r}")
    if (frames is not None and frames < 1) or (size is not None and size < 2) or shard_size < 1 or workers < 1:
        raise ValueError("need frames >= 1, size >= 2, shard_size >= 1 and workers >= 1")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")) or (out / "dataset.json").exists():
        raise ValueError(f"{out} already holds a dataset; choose an empty --out directory")

    rows, has_split = _read_rows(annotations)
    rejected: list[tuple[_Row, str]] = []
    good: list[_Row] = []
    for r in rows:
        reason = ("empty label" if not r.label else "empty path" if not r.path
                  else f"missing file {videos / r.path}" if not (videos / r.path).is_file()
                  else f"bad split {r.split!r} (use train, val or test)" if has_split and r.split not in
                  ("train", "val", "test")
                  else f"bad segment start={r.start!r} end={r.end!r} (frame indices, 0 <= start < end)"
                  if _segment(r) is None else None)
        if reason:
            rejected.append((r, reason))
        else:
            good.append(r)
    class_names, by_index = _class_names([r.label for r in good])
    if not has_split:
        split_of = _subject_split([r.subject or r.path for r in good], seed, test_fraction)
        for r in good:
            r.split = split_of[r.subject or r.path]

    order = [good[i] for i in np.random.default_rng([seed, 17]).permutation(len(good))]  # mix shards
    jobs = [(str(videos / r.path), frames, size, fmt, *_segment(r)) for r in order]
    sinks: dict[str, ShardSink] = {}
    geometry: set[tuple[int, int, int]] = set()
    fps_seen: set[float] = set()
    ctx = multiprocessing.get_context("spawn") if workers > 1 else None
    pool = ctx.Pool(workers) if ctx else None
    try:
        results = pool.imap(_encode_clip, jobs, chunksize=1) if pool else map(_encode_clip, jobs)
        for r, res in tqdm(zip(order, results), total=len(jobs), desc="pack", unit="clip", disable=not progress):
            if isinstance(res, str):
                rejected.append((r, res))
                continue
            data, meta = res
            label = int(r.label) if by_index else class_names.index(r.label)
            key = f"{r.split}_{r.line:07d}"  # unique: the CSV line
            meta |= {"label": label, "label_name": class_names[label], "subject": r.subject, "source": r.path,
                     "segment": [int(r.start or 0), int(r.end) if r.end else None]}
            if r.split not in sinks:
                sinks[r.split] = ShardSink(out, r.split, shard_size)
            sinks[r.split].write(make_sample(key, label, data, fmt, meta))
            geometry.add((meta["num_frames"], meta["height"], meta["width"]))
            fps_seen.add(meta["fps"])
    finally:
        if pool:
            pool.close()
            pool.join()
    splits = {s: sinks[s].close() for s in sorted(sinks)}

    rejected.sort(key=lambda x: x[0].line)
    rej_path = out / REJECTED_CSV
    with open(rej_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["line", "path", "label", "subject", "split", "start", "end", "reason"])
        for r, reason in rejected:
            w.writerow([r.line, r.path, r.label, r.subject, r.split, r.start, r.end, reason])
    for r, reason in rejected:
        print(f"rejected line {r.line} ({r.path or '<no path>'}): {reason}")
    packed = sum(s.num_samples for s in splits.values())
    if packed == 0:
        raise ValueError(f"no clip of {annotations} could be packed ({len(rejected)} rejected, see {rej_path})")
    info = DatasetInfo(
        name=name or out.name, num_classes=len(class_names), class_names=class_names, splits=splits,
        num_frames=_one({g[0] for g in geometry}), height=_one({g[1] for g in geometry}),
        width=_one({g[2] for g in geometry}), flip_ok=flip_ok, format=fmt, fps=_one(fps_seen),
        source={"packed_by": "msf_scale.data.packer", "videos": str(videos), "annotations": str(annotations),
                "frames": frames, "size": size, "seed": seed, "labels": "indices" if by_index else "names",
                "rejected": len(rejected)})
    write_dataset_info(out, info)
    counts = ", ".join(f"{s} {v.num_samples}" for s, v in splits.items())
    print(f"packed {packed} clips ({counts}) into {out}; rejected {len(rejected)} (listed in {rej_path})")
    return PackResult(info, packed, len(rejected), rej_path)
