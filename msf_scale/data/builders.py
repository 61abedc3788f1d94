"""The data a run's `data` config section asks for: the dataset directory, its val split, the train, val and test
loaders.

The val split (`val_split`) is the dataset's own `val` split when it has one, else, with `data.val_fraction F`, a
carve-out of whole training subjects seeded by `data.val_seed` (`data/splits.py`: never a subject of the test
split), read in place: the training stream drops the carved keys and the val loader reads only them from the
training shards (no copy).
With neither, a run has no val split (and evaluates, and selects best/, on test: train_steps.Evaluator).

The training and evaluation entry points hand the section over whole (`cfg.data`), with what the section does not
own: the clip geometry (the model's frames and size), the batch, the seed and the rank. The lower-level builders
in loader.py take plain arguments, so that tests and tools can call them without a config.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from msf_scale.config import ConfigError, DataConfig, UserPathError
from msf_scale.data.loader import EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from msf_scale.data.schema import read_dataset_info
from msf_scale.data.splits import ValCarve, has_split, overlapping_subjects, plan_carve


@dataclass
class ValSplit:
    """Where a run's val split comes from: the dataset's own `val` split, or a carve-out of its training subjects."""
    source: str                         # "dataset" | "carved"
    num_samples: int
    subjects: tuple[str, ...]
    carve: ValCarve | None = None       # carved: the keys of each side
    counts: list[int] | None = None     # carved: val samples in each training shard (the val loader's length)
    shared: dict[str, list[str]] | None = None   # dataset: subjects val shares with another split (should be none)

    def describe(self) -> str:
        if self.source == "dataset":
            return f"the dataset's own val split ({self.num_samples} clips, {len(self.subjects)} subjects)"
        c = self.carve
        candidates = len(c.val_subjects) + len(c.train_subjects) - len(c.shared_with_test)
        shared = (f"; {len(c.shared_with_test)} more training subjects are also in test: never val, kept in training"
                  if c.shared_with_test else "")
        return (f"carved from train: {len(c.val_subjects)} of the {candidates} training subjects not also in test "
                f"(data.val_fraction {c.fraction:g}, data.val_seed {c.seed}), {len(c.val_keys)} clips; training "
                f"keeps {len(c.train_keys)} clips{shared}")

    def identity(self) -> dict[str, Any]:
        """What makes this val split this one, for a checkpoint to record (see split_identity)."""
        if self.carve is not None:
            names = sorted(self.carve.val_keys)
            fraction, seed = self.carve.fraction, self.carve.seed
        else:
            names, fraction, seed = sorted(self.subjects), None, None
        digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
        return {"source": self.source, "fraction": fraction, "seed": seed, "subjects": len(self.subjects),
                "hash": digest}

    def to_json(self) -> dict[str, Any]:
        out = {"source": self.source, "num_samples": self.num_samples, "subjects": list(self.subjects)}
        if self.carve is not None:
            out.update(fraction=self.carve.fraction, seed=self.carve.seed, train_samples=len(self.carve.train_keys))
        if self.shared:
            out["shares_subjects_with"] = self.shared
        return out


def overlap_error(root: str, shared: dict[str, list[str]]) -> str:
    """The one-line refusal of a dataset val split that shares subjects with other splits."""
    where = "; ".join(f"{k}: {', '.join(v[:5])}{'...' if len(v) > 5 else ''} ({len(v)})" for k, v in shared.items())
    return (f"{root}: its val split shares subjects with other splits ({where}); a val split must share none with "
            "train or test (selecting on it would read training or test subjects): fix the dataset's split "
            "column, or pass --data.allow_val_overlap true to use it anyway")


def split_identity(val: ValSplit | None) -> dict[str, Any]:
    """A val split's identity, which a checkpoint records and a resume must match: its source (dataset / carved /
    none), the carve's fraction and seed, the number of val subjects and a hash of the sorted val keys (carved) or
    val subjects (the dataset's own)."""
    return {"source": "none"} if val is None else val.identity()


def describe_identity(ident: dict[str, Any]) -> str:
    """One phrase for a split identity (split_identity), as a resume refusal names it."""
    if ident.get("source") == "none":
        return "no val split"
    if ident.get("source") == "carved":
        return (f"carved (data.val_fraction {ident.get('fraction'):g}, data.val_seed {ident.get('seed')}, "
                f"{ident.get('subjects')} subjects, keys {ident.get('hash')})")
    return f"the dataset's own ({ident.get('subjects')} subjects, {ident.get('hash')})"


def val_split(data: DataConfig, root: str) -> ValSplit | None:
    """The run's val split (see the module doc), or None. A dataset's own val split wins; asking for a carve-out of
    a dataset that has one is refused (it would select on other data than the dataset's val), and so is a dataset
    val split that shares subjects with train or test, unless data.allow_val_overlap. The carve is seeded
    by `data.val_seed`, not `train.seed`: the runs of a multi-seed study hold out the same subjects."""
    from msf_scale.data.splits import split_subjects

    if has_split(root, "val"):
        if data.val_fraction:
            raise ConfigError(f"data.val_fraction {data.val_fraction:g}: {root} has its own val split; it is used "
                              "as it is (pass --data.val_fraction 0)")
        info = read_dataset_info(root)
        shared = {k: v for k, v in overlapping_subjects(root, "val").items() if v}
        if info.source.get("tuning_view"):   # msf-scale tune's view: its "test" is the val split, by construction
            shared.pop("test", None)
        if shared and not data.allow_val_overlap:
            raise ConfigError(overlap_error(root, shared))
        return ValSplit("dataset", info.splits["val"].num_samples, tuple(sorted(split_subjects(root, "val"))),
                        shared=shared or None)
    if not data.val_fraction:
        return None
    try:
        carve, by_shard = plan_carve(root, data.val_fraction, data.val_seed)
    except ValueError as e:
        raise ConfigError(f"data.val_fraction {data.val_fraction:g} on {root}: {e}") from None
    counts = [sum(carve.is_val(k) for k in part) for part in by_shard]
    return ValSplit("carved", len(carve.val_keys), carve.val_subjects, carve=carve, counts=counts)


def data_root(root: str | None, synth: dict[str, Any]) -> str:
    """The dataset directory: the given one, or the synthetic default (generated once into the cache)."""
    if root is None:
        from msf_scale.data.synthetic import ensure_synthetic   # lazy: numpy-heavy, and only for the default
        return str(ensure_synthetic(**synth))
    try:
        read_dataset_info(root)  # a missing directory or dataset.json raises FileNotFoundError naming it
    except FileNotFoundError as e:
        raise UserPathError(str(e)) from None
    return str(root)


def dataset_root(data: DataConfig) -> str:
    """`data_root` of a config section."""
    return data_root(data.root, data.synth)


def train_loader(data: DataConfig, root: str, *, num_frames: int, img_size: int, batch_size: int, seed: int,
                 rank: int, world_size: int, val: ValSplit | None = None) -> TrainLoader:
    """The training stream of `root` as the section describes it (workers, epoch length, flip, crop scale); with a
    carved val split, without its samples (an epoch is then the kept clips unless data.epoch_samples says)."""
    carve = val.carve if val is not None else None
    kw = {} if carve is None else {"drop_keys": carve.val_keys}
    epoch_samples = data.epoch_samples if carve is None else (data.epoch_samples or len(carve.train_keys))
    return build_train_loader(root, batch_size=batch_size, num_frames=num_frames, img_size=img_size,
                              num_workers=data.num_workers, rank=rank, world_size=world_size, seed=seed,
                              epoch_samples=epoch_samples, flip=data.flip, min_scale=data.min_scale, **kw)


def val_loader(data: DataConfig, root: str, val: ValSplit, *, num_frames: int, img_size: int, batch_size: int,
               rank: int, world_size: int) -> EvalLoader:
    """The val split with the test views (num_clips x num_crops), so that selection measures what test measures."""
    batch_clips = data.eval_batch_size or batch_size
    if val.carve is None:
        return split_loader(root, "val", batch_clips, num_frames, img_size, data.num_workers, rank, world_size,
                            data.num_clips, data.num_crops)
    return build_eval_loader(root, split="train", batch_size=max(1, batch_clips // (data.num_clips * data.num_crops)),
                             num_frames=num_frames, img_size=img_size, num_workers=data.num_workers, rank=rank,
                             world_size=world_size, num_clips=data.num_clips, num_crops=data.num_crops,
                             keep_keys=val.carve.val_keys, keep_counts=val.counts)


def eval_loader(data: DataConfig, root: str, *, num_frames: int, img_size: int, batch_size: int, rank: int,
                world_size: int) -> EvalLoader:
    """The test split with the section's views (num_clips x num_crops) and eval batch (default: the train batch)."""
    return split_loader(root, "test", data.eval_batch_size or batch_size, num_frames, img_size, data.num_workers,
                        rank, world_size, data.num_clips, data.num_crops)


def split_loader(root: str, split: str, batch_clips: int, num_frames: int, img_size: int, num_workers: int,
                 rank: int, world_size: int, num_clips: int, num_crops: int) -> EvalLoader:
    """An eval loader of any split whose forward holds about `batch_clips` clips (views included)."""
    info = read_dataset_info(root)
    if split not in info.splits:
        raise ValueError(f"split {split!r} not in {root} (has {sorted(info.splits)}); pass --split")
    views = num_clips * num_crops
    return build_eval_loader(root, split=split, batch_size=max(1, batch_clips // views), num_frames=num_frames,
                             img_size=img_size, num_workers=num_workers, rank=rank, world_size=world_size,
                             num_clips=num_clips, num_crops=num_crops)
