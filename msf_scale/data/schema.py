"""The shard dataset on disk: ``dataset.json``, shard naming, the sample encoding, and the shard writer.

A dataset is a directory holding ``dataset.json`` and tar shards ``{split}-{index:06d}.tar`` written with
webdataset's ``ShardWriter``. One sample is three tar members sharing a key:

* ``<key>.npy`` (uint8 array, T x H x W x 3, ``np.save`` format) or ``<key>.mp4`` (any FFmpeg build decodes it),
* ``<key>.cls`` (the class index as ASCII digits),
* ``<key>.json`` (label, label_name, subject, num_frames, fps, source, height, width).

Everything that reads or writes that layout lives here, so that the packer, the generator and the loader
cannot disagree about it.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
DATASET_JSON = "dataset.json"
VIDEO_FORMATS = ("npy", "mp4")
SPLITS = ("train", "val", "test")
# ImageNet statistics, in RGB order on [0, 1] pixels: what VideoMamba-style backbones are pre-trained with.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass
class SplitInfo:
    """One split: shard file names (relative to the dataset root) and how many samples each holds."""

    shards: list[str]
    num_samples: int
    shard_samples: list[int] = field(default_factory=list)  # per shard; empty when unknown


@dataclass
class DatasetInfo:
    """What ``dataset.json`` says. ``num_frames``/``height``/``width`` are None when clips differ."""

    name: str
    num_classes: int
    class_names: list[str]
    splits: dict[str, SplitInfo]
    num_frames: int | None
    height: int | None
    width: int | None
    flip_ok: bool  # False when a horizontal flip changes the label (left/right-specific classes)
    format: str = "npy"
    fps: float | None = None
    source: dict[str, Any] = field(default_factory=dict)  # generator parameters or packer inputs
    root: str = ""  # filled in by read_dataset_info; not stored

    def shard_paths(self, split: str) -> list[str]:
        """Absolute shard paths of ``split``; a ValueError names the splits that exist."""
        if split not in self.splits:
            raise ValueError(f"split {split!r} not in dataset {self.root or self.name}; "
                             f"available: {sorted(self.splits)}")
        return [os.path.join(self.root, s) for s in self.splits[split].shards]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("root")
        d["schema_version"] = SCHEMA_VERSION
        return d


def read_dataset_info(root: str | os.PathLike) -> DatasetInfo:
    """Read ``root/dataset.json``; a missing directory or file raises FileNotFoundError saying how to make one."""
    root = Path(root)
    hint = (f"create one with `msf-scale data synth --out {root}` (synthetic) or "
            f"`msf-scale data pack --videos DIR --annotations CSV --out {root}` (real clips)")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory {root} does not exist; {hint}")
    path = root / DATASET_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {root} is not a shard dataset; {hint}")
    with open(path) as f:
        d = json.load(f)
    missing = {"name", "num_classes", "class_names", "splits"} - set(d)
    if missing:
        raise ValueError(f"{path} lacks the fields {sorted(missing)}; re-create the dataset")
    splits = {k: SplitInfo(shards=list(v["shards"]), num_samples=int(v["num_samples"]),
                           shard_samples=[int(n) for n in v.get("shard_samples", [])])
              for k, v in d["splits"].items()}
    info = DatasetInfo(
        name=d["name"], num_classes=int(d["num_classes"]), class_names=list(d["class_names"]), splits=splits,
        num_frames=d.get("num_frames"), height=d.get("height"), width=d.get("width"),
        flip_ok=bool(d.get("flip_ok", True)), format=d.get("format", "npy"), fps=d.get("fps"),
        source=d.get("source", {}), root=str(root))
    if len(info.class_names) != info.num_classes:
        raise ValueError(f"{path}: {len(info.class_names)} class_names for num_classes={info.num_classes}")
    return info


def write_dataset_info(root: str | os.PathLike, info: DatasetInfo) -> Path:
    """Write ``dataset.json`` atomically (tmp file, then rename), so a reader never sees half of it."""
    path = Path(root) / DATASET_JSON
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(info.to_json(), f, indent=2)
    os.replace(tmp, path)
    return path


def shard_pattern(root: str | os.PathLike, split: str) -> str:
    return os.path.join(str(root), f"{split}-%06d.tar")


def npy_bytes(video: np.ndarray) -> bytes:
    """Encode a uint8 clip (T x H x W x 3) as ``.npy`` bytes (exact, no pickle)."""
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"a clip must be uint8 T x H x W x 3, got {video.dtype} {video.shape}")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(video), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    video = np.load(io.BytesIO(data), allow_pickle=False)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] == 0:
        raise ValueError(f"bad npy clip: {video.dtype} {video.shape} (want uint8 T x H x W x 3, T > 0)")
    return video


def make_sample(key: str, label: int, video_bytes: bytes, fmt: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The tar members of one sample. ``key`` must not contain '.' (webdataset splits keys at the first dot)."""
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
    if fmt not in VIDEO_FORMATS:
        raise ValueError(f"format {fmt!r}: use one of {VIDEO_FORMATS}")
    return {"__key__": key, fmt: video_bytes, "cls": str(int(label)).encode("ascii"),
            "json": json.dumps(meta, sort_keys=True).encode("utf-8")}


class ShardSink:
    """webdataset ShardWriter for one split that remembers each shard's name and sample count.

    Tar member mtimes are fixed (0) so that the same samples give byte-identical shards.
    """

    def __init__(self, root: str | os.PathLike, split: str, shard_size: int):
        import webdataset as wds

        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.shards: list[str] = []
        self.shard_samples: list[int] = []
        self._writer = wds.ShardWriter(shard_pattern(root, split), maxcount=shard_size, verbose=0,
                                       encoder=False, mtime=0.0, post=self._closed)

    def _closed(self, fname: str) -> None:
        self.shards.append(os.path.basename(fname))
        self.shard_samples.append(self._writer.count)

    def write(self, sample: dict[str, Any]) -> None:
        self._writer.write(sample)

    def close(self) -> SplitInfo:
        self._writer.close()
        return SplitInfo(shards=self.shards, num_samples=sum(self.shard_samples),
                         shard_samples=self.shard_samples)
