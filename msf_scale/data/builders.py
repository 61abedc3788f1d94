"""The data a run's `data` config section asks for: the dataset directory and the train and test loaders.

The training and evaluation entry points hand the section over whole (`cfg.data`), with what the section does not
own: the clip geometry (the model's frames and size), the batch, the seed and the rank. The lower-level builders
in loader.py take plain arguments, so that tests and tools can call them without a config.
"""
from __future__ import annotations

from typing import Any

from msf_scale.config import DataConfig, UserPathError
from msf_scale.data.loader import EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from msf_scale.data.schema import read_dataset_info


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
                 rank: int, world_size: int) -> TrainLoader:
    """The training stream of `root` as the section describes it (workers, epoch length, flip, crop scale)."""
    return build_train_loader(root, batch_size=batch_size, num_frames=num_frames, img_size=img_size,
                              num_workers=data.num_workers, rank=rank, world_size=world_size, seed=seed,
                              epoch_samples=data.epoch_samples, flip=data.flip, min_scale=data.min_scale)


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
