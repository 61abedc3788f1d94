"""The streaming loaders the training and evaluation loops use: builders, iteration, statistics.

``build_train_loader`` gives a fixed number of full batches per epoch and rank, whose order and augmentation are
a pure function of (seed, epoch, rank, world_size, num_workers): ``set_epoch(e, start_batch=k)`` then ``iter``
yields exactly batches k.. of epoch e (exact resume). ``build_eval_loader`` yields every sample of a split
exactly once across ranks x workers, with deterministic multi-view crops. Both count corrupt samples and
shards (logged once each, skipped), the clips delivered and the time the consumer waited (``.stats``).
Rank and world size are arguments, never read from torch.distributed, so that tests can simulate ranks.

Either builder can read part of a split by sample key (a val split carved from the training split without a copy,
``data/splits.py``): ``drop_keys`` leaves those samples out of the training stream, ``keep_keys`` makes an eval
loader read only those. With neither, the streams are exactly the unfiltered ones.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from .schema import DatasetInfo, read_dataset_info
from .streams import ClipSpec, ErrorLog, EvalStream, TrainStream

log = logging.getLogger("msf_scale.data")


@dataclass
class LoaderStats:
    """Cumulative since the loader was built or ``reset()``: what the consumer got and how long it waited."""

    clips: int = 0  # clips delivered
    batches: int = 0
    wait_s: float = 0.0  # seconds spent inside next(): the consumer waiting for data
    elapsed_s: float = 0.0  # seconds from the start of iteration to the last batch delivered
    corrupt: int = 0  # corrupt samples skipped + shard reads that failed part-way
    corrupt_shards: int = 0  # of which shard reads

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def wait_fraction(self) -> float:
        return self.wait_s / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def reset(self) -> None:
        self.__init__()

    def as_dict(self) -> dict[str, float]:
        return asdict(self) | {"clips_per_s": self.clips_per_s, "wait_fraction": self.wait_fraction}


def _identity(x: Any) -> Any:
    return x


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # parallelism comes from workers; threads per worker would oversubscribe


class _Loader:
    """Runs a stream through a torch DataLoader (batch_size=None) and keeps the statistics."""

    def __init__(self, stream: torch.utils.data.IterableDataset, num_workers: int, pin_memory: bool,
                 prefetch_factor: int):
        self.stream, self.num_workers = stream, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.stats = LoaderStats()
        self._logged: set[str] = set()

    def _note(self, meta: dict[str, Any]) -> None:
        for kind, where, reason in meta.get("errors", ()):
            self.stats.corrupt += 1
            self.stats.corrupt_shards += kind == "shard"
            if where not in self._logged:
                self._logged.add(where)
                log.warning("skipped corrupt %s %s (%s)", kind, where, reason)

    def _items(self) -> Iterator[dict[str, Any]]:
        # A fresh DataLoader per pass: workers are forked with the current epoch and resume point.
        kw = {"prefetch_factor": self.prefetch_factor} if self.num_workers > 0 else {}
        dl = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                        worker_init_fn=_worker_init if self.num_workers > 0 else None,
                        pin_memory=self.pin_memory, persistent_workers=False, **kw)
        it = iter(dl)
        last = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            now = time.perf_counter()
            self.stats.wait_s += now - t0
            self.stats.elapsed_s += now - last
            last = now
            self._note(item["meta"])
            if "video" not in item:  # markers: error reports and resume placeholders
                continue
            self.stats.clips += len(item["label"])
            self.stats.batches += 1
            yield item


class TrainLoader(_Loader):
    """``len()`` batches per epoch per rank, each [B, 3, T, S, S] float32 + [B] int64. See ``set_epoch``."""

    stream: TrainStream

    def __len__(self) -> int:
        return self.stream.num_batches

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select epoch ``epoch``; the next iteration starts at its batch ``start_batch`` (earlier ones are
        skipped before decoding), so a resumed run sees exactly the batches the interrupted one would have."""
        if epoch < 0 or not 0 <= start_batch <= len(self):
            raise ValueError(f"set_epoch: need epoch >= 0 and 0 <= start_batch <= {len(self)}, "
                             f"got {epoch}, {start_batch}")
        self.stream.epoch, self.stream.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for item in self._items():
            yield item["video"], item["label"]


class EvalLoader(_Loader):
    """Yields (video [B, V, 3, T, S, S], label [B], keys); short batches at the end of each worker's share."""

    stream: EvalStream

    def __init__(self, stream: EvalStream, num_workers: int, pin_memory: bool, prefetch_factor: int,
                 shard_samples: list[int]):
        super().__init__(stream, num_workers, pin_memory, prefetch_factor)
        self._shard_samples = shard_samples

    @property
    def num_samples(self) -> int | None:
        """Samples this rank will see (from dataset.json; None when it lacks per-shard counts)."""
        per = self._per_stream()
        return None if per is None else sum(per)

    def _per_stream(self) -> list[int] | None:
        from .streams import eval_assignment

        s = self.stream
        if len(self._shard_samples) != len(s.urls):
            return None
        W = max(1, self.num_workers)
        return [sum(len(range(res, self._shard_samples[sh], mod)) for sh, mod, res in
                    eval_assignment(len(s.urls), s.world_size * W, s.rank * W + w)) for w in range(W)]

    def __len__(self) -> int:
        per = self._per_stream()
        if per is None:
            raise TypeError("this dataset.json has no per-shard sample counts; the eval length is unknown")
        return sum(math.ceil(n / self.stream.batch_size) for n in per)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        for item in self._items():
            yield item["video"], item["label"], item["keys"]


class KeyFilteredTrainStream(TrainStream):
    """A TrainStream that never yields the samples whose key is in ``drop_keys`` (a carved val split): they are
    read with their shard and dropped before decoding, after the seeded shuffle, so the order stays a pure
    function of the seed and the position (exact resume) and no dropped sample is ever decoded."""

    def __init__(self, *args: Any, drop_keys: frozenset[str], **kw: Any):
        super().__init__(*args, **kw)
        self.drop_keys = frozenset(drop_keys)

    def _raw(self, g: int, G: int, log: ErrorLog) -> Iterator[dict[str, Any]]:
        return (s for s in super()._raw(g, G, log) if s.get("__key__") not in self.drop_keys)


class KeyFilteredEvalStream(EvalStream):
    """An EvalStream over the samples of its shards whose key is in ``keep_keys`` (a val split carved from the
    training shards). It is EvalStream's iteration (its `__iter__`) with the filter applied to a shard's samples
    before they are dealt out, so every kept sample is decoded by exactly one stream and the per-shard counts of kept
    keys give the loader's length."""

    def __init__(self, *args: Any, keep_keys: frozenset[str], **kw: Any):
        super().__init__(*args, **kw)
        self.keep_keys = frozenset(keep_keys)

    def _shard_samples(self, shard: int, log: ErrorLog) -> Iterator[dict[str, Any]]:
        return (x for x in super()._shard_samples(shard, log) if x.get("__key__") in self.keep_keys)


def _check(batch_size: int, num_frames: int, img_size: int, num_workers: int, rank: int, world_size: int) -> None:
    checks = [(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"),
              (num_frames >= 1, f"num_frames must be >= 1, got {num_frames}"),
              (img_size >= 1, f"img_size must be >= 1, got {img_size}"),
              (num_workers >= 0, f"num_workers must be >= 0, got {num_workers}"),
              (world_size >= 1 and 0 <= rank < world_size, f"need 0 <= rank < world_size, got {rank}, {world_size}")]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


def _shards(info: DatasetInfo, split: str) -> list[str]:
    urls = info.shard_paths(split)
    if not urls:
        raise ValueError(f"split {split!r} of {info.root} has no shards")
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) listed in {info.root}/dataset.json are missing, "
                                f"e.g. {missing[0]}; re-create or re-copy the dataset")
    return urls


def build_train_loader(root: str | os.PathLike, *, batch_size: int, num_frames: int, img_size: int,
                       num_workers: int = 0, rank: int = 0, world_size: int = 1, seed: int = 0,
                       epoch_samples: int | None = None, flip: bool | None = None, min_scale: float = 0.5,
                       split: str = "train", shuffle_buffer: int = 256, pin_memory: bool = False,
                       prefetch_factor: int = 2, drop_keys: frozenset[str] | None = None) -> TrainLoader:
    """Training batches for one rank: ceil(epoch_samples / (batch_size x world_size)) full batches per epoch.

    ``flip=None`` follows the dataset's ``flip_ok``; ``min_scale`` is the smallest crop area of the random
    resized crop; ``shuffle_buffer`` raw (encoded) samples are held per worker for sample shuffling: memory is
    shuffle_buffer x the clip's stored size per worker (shards are written in shuffled order, so a few hundred do).
    ``drop_keys``: samples left out of the stream (a carved val split); give ``epoch_samples`` with it (the kept
    count), since dataset.json counts the whole split.
    """
    _check(batch_size, num_frames, img_size, num_workers, rank, world_size)
    info = read_dataset_info(root)
    urls = _shards(info, split)
    if flip is None:
        flip = info.flip_ok
    elif flip and not info.flip_ok:
        raise ValueError(f"flip=True, but {info.root} says a horizontal flip changes its labels (flip_ok=false); "
                         "pass flip=None to follow the dataset, or flip=False")
    if not 0 < min_scale <= 1:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
    n = info.splits[split].num_samples if epoch_samples is None else epoch_samples
    if n < 1:
        raise ValueError(f"epoch_samples must be >= 1 (split {split!r} holds {info.splits[split].num_samples})")
    num_batches = math.ceil(n / (batch_size * world_size))
    kw = dict(rank=rank, world_size=world_size, num_workers=num_workers, seed=seed, min_scale=min_scale,
              flip=bool(flip), shuffle_buffer=shuffle_buffer)
    spec = ClipSpec(num_frames, img_size, info.num_classes)
    if drop_keys is None:
        stream = TrainStream(urls, spec, batch_size, num_batches, **kw)
    else:
        stream = KeyFilteredTrainStream(urls, spec, batch_size, num_batches, drop_keys=drop_keys, **kw)
    return TrainLoader(stream, num_workers, pin_memory, prefetch_factor)


def build_eval_loader(root: str | os.PathLike, split: str = "test", *, batch_size: int, num_frames: int,
                      img_size: int, num_workers: int = 0, rank: int = 0, world_size: int = 1, num_clips: int = 1,
                      num_crops: int = 1, pin_memory: bool = False, prefetch_factor: int = 2,
                      keep_keys: frozenset[str] | None = None, keep_counts: list[int] | None = None) -> EvalLoader:
    """Every sample of ``split`` once across ranks x workers, as ``num_clips`` x ``num_crops`` views
    (evenly spaced temporal clips; crops of the short side spread along the long side, 1 = centre).
    ``keep_keys``: only these samples of the split (a val split carved from train); ``keep_counts``, the number of
    them in each shard, gives the loader its length (read from the shards when not given)."""
    _check(batch_size, num_frames, img_size, num_workers, rank, world_size)
    if num_clips < 1 or num_crops < 1:
        raise ValueError(f"num_clips and num_crops must be >= 1, got {num_clips}, {num_crops}")
    info = read_dataset_info(root)
    urls = _shards(info, split)
    spec, kw = ClipSpec(num_frames, img_size, info.num_classes), dict(
        rank=rank, world_size=world_size, num_workers=num_workers, num_clips=num_clips, num_crops=num_crops)
    if keep_keys is None:
        stream = EvalStream(urls, spec, batch_size, **kw)
        return EvalLoader(stream, num_workers, pin_memory, prefetch_factor, info.splits[split].shard_samples)
    if keep_counts is None:
        from .splits import read_subjects_by_shard
        keep_counts = [sum(k in keep_keys for k in part) for part in read_subjects_by_shard(root, split)]
    if len(keep_counts) != len(urls):
        raise ValueError(f"keep_counts has {len(keep_counts)} entries for the {len(urls)} shards of split {split!r}")
    stream = KeyFilteredEvalStream(urls, spec, batch_size, keep_keys=frozenset(keep_keys), **kw)
    return EvalLoader(stream, num_workers, pin_memory, prefetch_factor, list(keep_counts))
