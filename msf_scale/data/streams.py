"""What runs inside DataLoader workers: which shards a stream reads, sample shuffling, decoding, batching.

A *stream* is one (rank, worker) pair; there are G = world_size x num_workers of them, stream g = rank x W +
worker. Every item a stream yields is a dict with a ``meta`` entry carrying the errors met since its last
item (the main process counts and logs them); items without ``video`` are markers: a placeholder that keeps
the DataLoader's round-robin order when resuming mid-epoch, or the stream's final error report.

Training (``TrainStream``): stream g reads positions g, g+G, g+2G... of an endless sequence of shard
permutations drawn from (seed, epoch), shuffles samples in a seeded buffer, and cuts the raw samples into
batches. Worker w owns the rank's batches b = w, w+W, w+2W... (the order in which the DataLoader hands them
out), so batch b's samples depend only on (seed, epoch, rank, world_size, num_workers), and each clip's
augmentation on (seed, epoch, rank, world_size, its position b x batch_size + i in the rank's epoch): with one
worker, batch 4 and batch 2 x 2 accumulation steps see the same clips augmented alike. Resuming at batch k skips
earlier batches before decoding.

Evaluation (``EvalStream``): shards are dealt to streams (shard s -> stream s mod G); when there are fewer
shards than streams, the streams that share a shard take every m-th sample of it. Every sample of the split
is decoded by exactly one stream.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from . import transforms as tf
from .schema import load_npy


@dataclass
class ClipSpec:
    """What every stream decodes a sample into."""

    num_frames: int  # T
    img_size: int  # S
    num_classes: int


def worker_position() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def batch_tensor(*shape: int) -> torch.Tensor:
    """An uninitialised float32 batch; in a DataLoader worker it is born in shared memory, so that handing it to
    the main process costs no copy."""
    out = torch.empty(shape)
    return out.share_memory_() if get_worker_info() is not None else out


class ErrorLog:
    """Errors met by one stream: shard reads that failed part-way, and undecodable samples."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []  # (kind, where, reason), drained into each item's meta
        self.url = ""
        self._read_id = 0
        self._bad_reads: set[int] = set()

    def start_read(self, url: str) -> None:
        self.url, self._read_id = url, self._read_id + 1

    def shard_error(self, exn: BaseException) -> bool:
        """webdataset handler: note the failed read once, and go on with the next shard."""
        if self._read_id not in self._bad_reads:
            self._bad_reads.add(self._read_id)
            self.events.append(("shard", self.url, f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"))
        return True

    def sample_error(self, sample: dict[str, Any], exn: BaseException) -> None:
        where = f"{sample.get('__url__', self.url)}:{sample.get('__key__', '?')}"
        self.events.append(("sample", where, f"{type(exn).__name__}: {exn}"))

    def drain(self) -> dict[str, Any]:
        events, self.events = self.events, []
        return {"errors": events}


def read_samples(urls: Iterator[str], log: ErrorLog) -> Iterator[dict[str, Any]]:
    """Raw samples (undecoded tar members grouped by key) of the shards in ``urls``, in order.

    A shard that cannot be opened or ends early is reported to ``log`` and the samples before the damage are kept.
    """
    import webdataset as wds

    def sources():
        for url in urls:
            log.start_read(url)
            yield {"url": url}

    return wds.tarfile_to_samples(handler=log.shard_error)(sources())


def label_of(sample: dict[str, Any], num_classes: int) -> int:
    if "cls" not in sample:
        raise ValueError("sample has no .cls member")
    label = int(bytes(sample["cls"]).decode("ascii").strip())
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} outside 0..{num_classes - 1}")
    return label


def load_frames(sample: dict[str, Any], pick: Callable[[int], list[int]]) -> np.ndarray:
    """Decode only the frames ``pick(num_frames)`` asks for (a list of indices) -> uint8 T x H x W x 3."""
    if "npy" in sample:
        video = load_npy(sample["npy"])
        return video[pick(video.shape[0])]
    if "mp4" in sample:
        from .video import decode_mp4

        meta = json.loads(sample["json"]) if "json" in sample else {}
        n = int(meta.get("num_frames") or 0)
        if n <= 0:  # unknown length: decode everything once
            video = decode_mp4(sample["mp4"])
            return video[pick(video.shape[0])]
        return decode_mp4(sample["mp4"], pick(n))
    raise ValueError(f"sample has neither .npy nor .mp4 (members: {sorted(k for k in sample if k[0] != '_')})")


def shuffled(samples: Iterator[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """Buffer shuffle: fill ``bufsize`` samples, then yield a random one and put the next in its place."""
    buf: list[Any] = []
    for s in samples:
        if len(buf) < bufsize:
            buf.append(s)
            continue
        k = rng.randrange(bufsize)
        yield buf[k]
        buf[k] = s
    rng.shuffle(buf)
    yield from buf


class TrainStream(IterableDataset):
    """Endless, seeded, resampled training batches of one rank, cut into the epoch's fixed number of batches."""

    def __init__(self, urls: list[str], spec: ClipSpec, batch_size: int, num_batches: int, *, rank: int,
                 world_size: int, num_workers: int, seed: int, min_scale: float, flip: bool, shuffle_buffer: int):
        super().__init__()
        self.urls, self.spec, self.batch_size, self.num_batches = urls, spec, batch_size, num_batches
        self.rank, self.world_size, self.num_workers, self.seed = rank, world_size, max(1, num_workers), seed
        self.min_scale, self.flip, self.shuffle_buffer = min_scale, flip, shuffle_buffer
        self.epoch, self.start_batch = 0, 0

    def _shard_sequence(self, g: int, G: int, counter: list[int]) -> Iterator[str]:
        """Positions g, g+G, ... of concatenated per-cycle permutations of the shards (seeded by the epoch)."""
        n, perms, empty = len(self.urls), {}, 0
        for i in range(g, 1 << 62, G):
            c = i // n
            if c not in perms:
                perms = {c: np.random.default_rng([self.seed, self.epoch, c, 1]).permutation(n)}
            before = counter[0]
            yield self.urls[perms[c][i % n]]
            empty = empty + 1 if counter[0] == before else 0
            if empty > 2 * n + 2:
                raise RuntimeError(f"no readable sample in {empty} consecutive train shards ({self.urls[:3]}...): "
                                   "the shards are corrupt or empty; re-create the dataset")

    def _raw(self, g: int, G: int, log: ErrorLog) -> Iterator[dict[str, Any]]:
        counter = [0]

        def counted(samples):
            for s in samples:
                counter[0] += 1
                yield s

        raw = counted(read_samples(self._shard_sequence(g, G, counter), log))
        rng = random.Random(int(np.random.SeedSequence([self.seed, self.epoch, self.rank, self.world_size, g, 2])
                                .generate_state(1)[0]))
        return shuffled(raw, self.shuffle_buffer, rng)

    def _decode_into(self, sample: dict[str, Any], rng: np.random.Generator, out: torch.Tensor) -> int:
        label = label_of(sample, self.spec.num_classes)
        clip = load_frames(sample, lambda n: tf.random_indices(n, self.spec.num_frames, rng))
        tf.train_view(clip, self.spec.img_size, rng, self.min_scale, self.flip, out=out)
        return label

    def _batch(self, raw: Iterator[dict[str, Any]], b: int, log: ErrorLog) -> dict[str, Any]:
        t, s = self.spec.num_frames, self.spec.img_size
        video = batch_tensor(self.batch_size, 3, t, s, s)
        labels: list[int] = []
        while not labels:  # a batch with no decodable sample at all is replaced by the next raw batch
            for i in range(self.batch_size):
                sample = next(raw)
                position = b * self.batch_size + i   # in the rank's epoch: same clip, same view at any batch size
                rng = np.random.default_rng([self.seed, self.epoch, self.rank, self.world_size, position])
                try:
                    labels.append(self._decode_into(sample, rng, video[len(labels)]))
                except Exception as e:  # noqa: BLE001 - any decode failure is a corrupt sample
                    log.sample_error(sample, e)
        for i in range(self.batch_size - len(labels)):  # keep batches full: repeat good clips of this batch
            video[len(labels)] = video[i]
            labels.append(labels[i])
        return {"video": video, "label": torch.tensor(labels, dtype=torch.int64), "batch": b, "meta": log.drain()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        w, W = worker_position()
        if W != self.num_workers:
            raise RuntimeError(f"TrainStream built for {self.num_workers} workers runs in {W}")
        log = ErrorLog()
        raw = self._raw(self.rank * W + w, self.world_size * W, log)
        q = self.start_batch // W
        for j, b in enumerate(range(w, self.num_batches, W)):
            if j < q or b < self.start_batch:  # before the resume point: read, never decoded
                for _ in range(self.batch_size):
                    next(raw)
                if j == q:  # this worker's turn in the round just before batch k: a placeholder keeps the order
                    yield {"meta": log.drain(), "placeholder": True}
                continue
            yield self._batch(raw, b, log)
        yield {"meta": log.drain()}


def eval_assignment(num_shards: int, num_streams: int, g: int) -> list[tuple[int, int, int]]:
    """(shard, modulus, residue) pairs of stream g: it decodes samples i of the shard with i % modulus == residue."""
    if num_shards >= num_streams:
        return [(s, 1, 0) for s in range(g, num_shards, num_streams)]
    s = g % num_shards
    return [(s, len(range(s, num_streams, num_shards)), g // num_shards)]


class EvalStream(IterableDataset):
    """Every sample of a split exactly once across ranks x workers; deterministic views; short last batches."""

    def __init__(self, urls: list[str], spec: ClipSpec, batch_size: int, *, rank: int, world_size: int,
                 num_workers: int, num_clips: int, num_crops: int):
        super().__init__()
        self.urls, self.spec, self.batch_size = urls, spec, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.num_clips, self.num_crops = num_clips, num_crops

    def _decode_into(self, sample: dict[str, Any], out: torch.Tensor) -> int:
        label = label_of(sample, self.spec.num_classes)
        t, n_clips = self.spec.num_frames, self.num_clips
        frames = load_frames(sample, lambda n: [i for c in range(n_clips) for i in tf.eval_indices(n, t, c, n_clips)])
        tf.eval_views([frames[c * t:(c + 1) * t] for c in range(n_clips)], self.spec.img_size, self.num_crops, out)
        return label

    def _shard_samples(self, shard: int, log: ErrorLog) -> Iterator[dict[str, Any]]:
        """The samples of shard `shard` that this split holds, before they are dealt out to the streams sharing the
        shard (every one of them; a subclass may filter, e.g. by key)."""
        return read_samples(iter([self.urls[shard]]), log)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        w, W = worker_position()
        if W != self.num_workers:
            raise RuntimeError(f"EvalStream built for {self.num_workers} workers runs in {W}")
        log = ErrorLog()
        t, s, v = self.spec.num_frames, self.spec.img_size, self.num_clips * self.num_crops
        video, labels, keys = batch_tensor(self.batch_size, v, 3, t, s, s), [], []
        for shard, mod, res in eval_assignment(len(self.urls), self.world_size * W, self.rank * W + w):
            for i, sample in enumerate(self._shard_samples(shard, log)):
                if i % mod != res:
                    continue
                try:
                    labels.append(self._decode_into(sample, video[len(labels)]))
                except Exception as e:  # noqa: BLE001 - any decode failure is a corrupt sample
                    log.sample_error(sample, e)
                    continue
                keys.append(sample["__key__"])
                if len(labels) == self.batch_size:
                    yield {"video": video, "label": torch.tensor(labels), "keys": keys, "meta": log.drain()}
                    video, labels, keys = batch_tensor(self.batch_size, v, 3, t, s, s), [], []
        if labels:
            yield {"video": video[:len(labels)].clone(), "label": torch.tensor(labels), "keys": keys,
                   "meta": log.drain()}
        yield {"meta": log.drain()}
