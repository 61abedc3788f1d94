"""Validation splits: which splits a dataset has, and a seeded, subject-independent carve-out of a val set from
the training split of a dataset that has none.

Hyper-parameters chosen on the test split overfit it (a leak): model selection (a Ray Tune search, early stopping,
picking a checkpoint) must read a val split whose subjects are in neither train nor test. A dataset gets one from
the packer's ``split`` column, from ``msf-scale data synth --val-subjects N``, or from :func:`carve_val`: whole
training subjects (a ``fraction`` of them, at least one, never all) move to val, chosen by a seeded permutation of
the sorted subject ids, so the same (subjects, fraction, seed) always gives the same split on any machine.

    subject_of = read_subjects(root, "train")         # key -> subject, from the shards' <key>.json members
    carve = carve_val(subject_of, fraction=0.2, seed=0)
    carve.is_val(key)                                  # the filter a training stream applies (train: not is_val)
    carve, by_shard = plan_carve(root, 0.2, seed=0)    # what train.py (--data.val_fraction) and tune carve: never a
                                                       # subject the test split also holds
    materialize_val_split(root, out, fraction=0.2)     # or: a new dataset dir with train / val / test shards

A sample without a subject is its own group (its ``source`` path, else its key), as the packer does. Nothing here
imports torch.
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np

from .schema import DATASET_JSON, SPLITS, ShardSink, read_dataset_info, write_dataset_info

_SHARD = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{6})\.tar$")
CARVE_STREAM = 4099   # a fixed second seed word: this permutation is independent of every other seeded choice


def dataset_splits(root: str | os.PathLike) -> list[str]:
    """The split names of a dataset that hold at least one sample, in train/val/test order then by name.

    From ``dataset.json`` where there is one; otherwise from the shard file names ``{split}-{index:06d}.tar``."""
    root = Path(root)
    if (root / DATASET_JSON).is_file():
        info = read_dataset_info(root)
        names = [s for s, v in info.splits.items() if v.num_samples > 0 or (v.shards and not v.shard_samples)]
    elif root.is_dir():
        names = sorted({m["split"] for p in root.iterdir() if (m := _SHARD.match(p.name))})
    else:
        raise FileNotFoundError(f"dataset directory {root} does not exist")
    order = {s: i for i, s in enumerate(SPLITS)}
    return sorted(set(names), key=lambda s: (order.get(s, len(order)), s))


def has_split(root: str | os.PathLike, split: str = "val") -> bool:
    return split in dataset_splits(root)


def _members(shard: str) -> Iterator[tuple[str, str, tarfile.TarFile, tarfile.TarInfo]]:
    """(key, extension, tar, member) of every regular member; the key is the name up to its first dot."""
    with tarfile.open(shard) as tar:
        for m in tar:
            if m.isfile():
                base = os.path.basename(m.name)
                key, _, ext = base.partition(".")
                yield os.path.join(os.path.dirname(m.name), key), ext, tar, m


def read_subjects_by_shard(root: str | os.PathLike, split: str = "train") -> list[dict[str, str]]:
    """Sample key -> subject of each shard of ``split`` (in dataset.json's shard order), from the ``<key>.json``
    members (video bytes are seeked over, not read). A sample whose metadata has no subject is its own group (its
    source path, else its key). A loader that filters a split by key needs the per-shard counts."""
    info = read_dataset_info(root)
    out: list[dict[str, str]] = []
    for shard in info.shard_paths(split):
        part: dict[str, str] = {}
        for key, ext, tar, m in _members(shard):
            if ext != "json":
                continue
            try:
                meta = json.loads(tar.extractfile(m).read())
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{shard}: the metadata of sample {key!r} is not JSON ({e})") from None
            subject = str(meta.get("subject") or "")
            part[key] = subject or f"source:{meta.get('source') or key}"
        out.append(part)
    if not any(out):
        raise ValueError(f"split {split!r} of {root} holds no sample metadata (<key>.json members)")
    return out


def read_subjects(root: str | os.PathLike, split: str = "train") -> dict[str, str]:
    """Sample key -> subject of every sample of ``split`` (see read_subjects_by_shard)."""
    return {k: v for part in read_subjects_by_shard(root, split) for k, v in part.items()}


@dataclass(frozen=True)
class ValCarve:
    """A subject-independent split of training samples into train and val."""

    train_keys: frozenset[str]
    val_keys: frozenset[str]
    train_subjects: tuple[str, ...]
    val_subjects: tuple[str, ...]
    fraction: float
    seed: int
    shared_with_test: tuple[str, ...] = ()   # training subjects the test split also holds: never val, kept in train

    def is_val(self, key: str) -> bool:
        return key in self.val_keys

    def to_json(self) -> dict:
        return {"fraction": self.fraction, "seed": self.seed, "val_subjects": list(self.val_subjects),
                "train_subjects": list(self.train_subjects), "val_samples": len(self.val_keys),
                "train_samples": len(self.train_keys), "shared_with_test": list(self.shared_with_test)}


def choose_val_subjects(subjects: Iterable[str], fraction: float, seed: int = 0) -> tuple[str, ...]:
    """round(fraction x #subjects) whole subjects, at least 1 and at most all but one, by a seeded permutation of
    the sorted ids (deterministic in the seed, independent of the order the samples were read in)."""
    uniq = sorted(set(subjects))
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    if len(uniq) < 2:
        raise ValueError(f"a subject-independent val split needs at least 2 training subjects, found {len(uniq)} "
                         f"({uniq}); pack the dataset with a split column holding val rows instead")
    n_val = min(len(uniq) - 1, max(1, round(fraction * len(uniq))))
    order = np.random.default_rng([int(seed), CARVE_STREAM]).permutation(len(uniq))
    return tuple(sorted(uniq[i] for i in order[:n_val]))


def carve_val(subject_of: Mapping[str, str], fraction: float, seed: int = 0,
              exclude: Iterable[str] = ()) -> ValCarve:
    """Split training samples (key -> subject) into train and val by whole subjects; see choose_val_subjects.
    Subjects in ``exclude`` (a test split's, where a dataset shares subjects between train and test) are never
    chosen for val, and the fraction is of the others (round(fraction x the training subjects not excluded)); with
    none excluded the choice is that of choose_val_subjects over every training subject."""
    ex = set(exclude)
    candidates = [s for s in subject_of.values() if s not in ex]
    if ex and len(set(candidates)) < 2 <= len(set(subject_of.values())):
        raise ValueError(f"a subject-independent val split needs at least 2 training subjects that are not also test "
                         f"subjects; {len(set(candidates))} of {len(set(subject_of.values()))} are not")
    val_subjects = choose_val_subjects(candidates, fraction, seed)
    vs = set(val_subjects)
    val_keys = frozenset(k for k, s in subject_of.items() if s in vs)
    train_keys = frozenset(subject_of) - val_keys
    train_subjects = tuple(sorted({subject_of[k] for k in train_keys}))
    shared = tuple(sorted(set(subject_of.values()) & ex))
    return ValCarve(train_keys, val_keys, train_subjects, val_subjects, float(fraction), int(seed), shared)


def plan_carve(root: str | os.PathLike, fraction: float, seed: int = 0) -> tuple[ValCarve, list[dict[str, str]]]:
    """The carve-out of ``root``'s training split that both a training run (``--data.val_fraction``, filtering the
    stream by key) and ``msf-scale tune --val-fraction`` (materialize_val_split) make: whole training subjects,
    never one that also appears in the test split. Returns the carve and the per-shard key -> subject of train."""
    by_shard = read_subjects_by_shard(root, "train")
    test = split_subjects(root, "test") if has_split(root, "test") else set()
    subject_of = {k: v for part in by_shard for k, v in part.items()}
    return carve_val(subject_of, fraction, seed, exclude=test), by_shard


def overlapping_subjects(root: str | os.PathLike, split: str = "val") -> dict[str, list[str]]:
    """Subjects ``split`` shares with each other split of the dataset (empty lists: subject-independent)."""
    mine = split_subjects(root, split)
    return {other: sorted(mine & split_subjects(root, other)) for other in dataset_splits(root) if other != split}


def split_subjects(root: str | os.PathLike, split: str) -> set[str]:
    return set(read_subjects(root, split).values())


def materialize_val_split(root: str | os.PathLike, out: str | os.PathLike, fraction: float, seed: int = 0,
                          shard_size: int | None = None) -> tuple[Path, ValCarve]:
    """Write a dataset at ``out`` whose train split is ``root``'s train minus the val subjects and whose val split is
    those subjects (copied sample by sample, bytes unchanged); every other split's shards are linked (symlinks to
    absolute paths), not copied. ``dataset.json`` records the carve in ``source.val_carve``. Costs a copy of the
    training split on disk: a training stream that filters by ``ValCarve.is_val`` avoids it."""
    root, out = Path(root).resolve(), Path(out)
    info = read_dataset_info(root)
    if has_split(root, "val"):
        raise ValueError(f"{root} already has a val split; use it (no carve-out needed)")
    carve, _ = plan_carve(root, fraction, seed)
    out.mkdir(parents=True, exist_ok=True)
    if (out / DATASET_JSON).exists() or any(out.glob("*.tar")):
        raise ValueError(f"{out} already holds a dataset; choose an empty directory")
    size = shard_size or max(info.splits["train"].shard_samples or [256])
    sinks = {"train": ShardSink(out, "train", size), "val": ShardSink(out, "val", size)}
    for shard in info.shard_paths("train"):
        sample: dict = {}
        for key, ext, tar, m in _members(shard):
            if sample and sample["__key__"] != key:
                sinks["val" if carve.is_val(sample["__key__"]) else "train"].write(sample)
                sample = {}
            sample.setdefault("__key__", key)
            sample[ext] = tar.extractfile(m).read()
        if sample:
            sinks["val" if carve.is_val(sample["__key__"]) else "train"].write(sample)
    splits = {name: sink.close() for name, sink in sinks.items()}
    for name, split in info.splits.items():
        if name == "train":
            continue
        for shard in split.shards:
            link = out / shard
            if not link.exists():
                os.symlink(root / shard, link)
        splits[name] = split
    info.splits = {k: splits[k] for k in sorted(splits, key=lambda s: (SPLITS + (s,)).index(s))}
    info.source = {**info.source, "val_carve": {"from": str(root), **carve.to_json()}}
    write_dataset_info(out, info)
    return out, carve
