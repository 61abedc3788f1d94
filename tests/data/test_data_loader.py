"""Streaming loaders: exact resume, determinism, fixed epoch length, exactly-once eval, corrupt data."""
from __future__ import annotations

import logging
import math
import os

import numpy as np
import pytest
import torch
from data_helpers import make_dataset

from msf_scale.data import build_eval_loader, build_train_loader, read_dataset_info
from msf_scale.data import streams
from msf_scale.data.schema import ShardSink, make_sample, npy_bytes

TRAIN = dict(batch_size=4, num_frames=4, img_size=12, seed=3, min_scale=0.4)


def _epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(v.clone(), y.clone()) for v, y in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_train_batches_shape_dtype_and_length(toy):
    root, truth = toy
    loader = build_train_loader(root, **TRAIN, epoch_samples=37, world_size=2, rank=1)
    assert len(loader) == math.ceil(37 / (4 * 2))
    batches = _epoch(loader)
    assert len(batches) == len(loader)
    for v, y in batches:
        assert v.shape == (4, 3, 4, 12, 12) and v.dtype == torch.float32
        assert y.shape == (4,) and y.dtype == torch.int64
    labels = torch.cat([y for _, y in batches])
    assert set(labels.tolist()) <= {lab for lab, _ in truth["train"].values()}
    assert loader.stats.clips == 4 * len(loader) and loader.stats.batches == len(loader)
    assert loader.stats.corrupt == 0 and loader.stats.elapsed_s >= loader.stats.wait_s > 0
    all_v = torch.cat([v for v, _ in batches])
    assert -2.2 < all_v.min() < -1.5 and 2.0 < all_v.max() < 2.7  # ImageNet-normalised 0..255 pixels


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_is_exact(toy, num_workers):
    root, _ = toy
    loader = build_train_loader(root, **TRAIN, num_workers=num_workers, epoch_samples=44)
    n = len(loader)
    loader.set_epoch(1)
    full = _epoch(loader)
    assert _same(full, _epoch(loader)), "iterating twice after one set_epoch must give identical batches"
    for k in (1, 2, n - 2, n):  # odd and even k: with 2 workers, k % W decides who resumes first
        loader.set_epoch(1, start_batch=k)
        assert _same(_epoch(loader), full[k:]), f"start_batch={k}"
    fresh = build_train_loader(root, **TRAIN, num_workers=num_workers, epoch_samples=44)
    fresh.set_epoch(1)
    assert _same(_epoch(fresh), full), "a new loader with the same arguments must reproduce the epoch"
    fresh.set_epoch(2)
    assert not _same(_epoch(fresh), full), "another epoch must shuffle and augment differently"


def test_resume_does_not_decode_skipped_batches(toy, monkeypatch):
    root, _ = toy
    calls = []
    real = streams.load_frames
    monkeypatch.setattr(streams, "load_frames", lambda s, pick: calls.append(1) or real(s, pick))
    loader = build_train_loader(root, **TRAIN, epoch_samples=40)
    loader.set_epoch(0, start_batch=7)
    assert len(_epoch(loader)) == len(loader) - 7
    assert len(calls) == (len(loader) - 7) * TRAIN["batch_size"]


def test_seed_rank_and_workers_change_the_stream(toy):
    root, _ = toy
    base = _epoch(build_train_loader(root, **TRAIN))
    assert not _same(_epoch(build_train_loader(root, **(TRAIN | {"seed": 4}))), base)
    assert not _same(_epoch(build_train_loader(root, **TRAIN, rank=1, world_size=2)),
                     _epoch(build_train_loader(root, **TRAIN, rank=0, world_size=2)))


def test_flip_follows_dataset_flag(tmp_path):
    make_dataset(tmp_path, {"train": 4}, shard_size=4, flip_ok=False)
    with pytest.raises(ValueError, match="flip_ok=false.*flip=None"):
        build_train_loader(tmp_path, **TRAIN, flip=True)
    assert build_train_loader(tmp_path, **TRAIN).stream.flip is False


def test_bad_arguments_name_the_fix(toy):
    root, _ = toy
    with pytest.raises(ValueError, match="rank < world_size"):
        build_train_loader(root, **TRAIN, rank=2, world_size=2)
    with pytest.raises(ValueError, match="min_scale"):
        build_train_loader(root, **(TRAIN | {"min_scale": 0.0}))
    with pytest.raises(ValueError, match="available"):
        build_eval_loader(root, "val", batch_size=2, num_frames=4, img_size=8)
    loader = build_train_loader(root, **TRAIN)
    with pytest.raises(ValueError, match="start_batch"):
        loader.set_epoch(0, start_batch=len(loader) + 1)


@pytest.mark.parametrize("num_shards", [1, 3, 7])
def test_eval_two_ranks_two_workers_see_each_sample_once(tmp_path, num_shards):
    total = 21
    truth = make_dataset(tmp_path, {"test": total}, shard_size=math.ceil(total / num_shards))
    assert len(read_dataset_info(tmp_path).splits["test"].shards) == num_shards
    seen: list[str] = []
    for rank in (0, 1):
        loader = build_eval_loader(tmp_path, "test", batch_size=4, num_frames=4, img_size=8, num_workers=2,
                                   rank=rank, world_size=2)
        keys = [k for _, _, batch_keys in loader for k in batch_keys]
        assert len(keys) == loader.num_samples
        seen += keys
    assert len(seen) == len(set(seen)) == total, "duplicates or missing samples"
    assert set(seen) == set(truth["test"])


def test_eval_multi_view_is_deterministic(toy):
    root, truth = toy
    kw = dict(batch_size=8, num_frames=3, img_size=10, num_clips=2, num_crops=3)
    a = list(build_eval_loader(root, "test", **kw))
    b = list(build_eval_loader(root, "test", **kw, num_workers=2))
    assert len(a) == len(build_eval_loader(root, "test", **kw))
    va = {k: v for video, _, keys in a for v, k in zip(video, keys)}
    vb = {k: v for video, _, keys in b for v, k in zip(video, keys)}
    assert va.keys() == vb.keys() == truth["test"].keys()
    for k in va:
        assert va[k].shape == (6, 3, 3, 10, 10)
        assert torch.equal(va[k], vb[k])
        assert not torch.equal(va[k][0], va[k][3]), "the two temporal clips should differ"


def _damaged_dataset(root) -> tuple[set[str], set[str]]:
    """Two shards of 6 samples: shard 0 holds one garbage .npy and one sample without .cls; shard 1 is cut in
    the middle. Returns (keys that must come back, keys that may come back from the cut shard)."""
    rng = np.random.default_rng(0)
    sink = ShardSink(root, "test", 6)
    keys = []
    for i in range(12):
        key = f"k{i:02d}"
        data = npy_bytes(rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
        sample = make_sample(key, i % 2, b"not a numpy file" if i == 2 else data, "npy", {"num_frames": 4})
        if i == 4:
            del sample["cls"]
        sink.write(sample)
        keys.append(key)
    split = sink.close()
    from msf_scale.data.schema import DatasetInfo, write_dataset_info

    write_dataset_info(root, DatasetInfo("damaged", 2, ["a", "b"], {"test": split, "train": split}, 4, 8, 8, True))
    cut = os.path.join(root, split.shards[1])
    size = os.path.getsize(cut)
    with open(cut, "r+b") as f:
        f.truncate(size // 2 + 100)
    return set(keys[:6]) - {"k02", "k04"}, set(keys[6:])


def test_corrupt_member_and_truncated_shard_are_skipped_and_counted(tmp_path, caplog):
    must, may = _damaged_dataset(tmp_path)
    caplog.set_level(logging.WARNING, logger="msf_scale.data")
    loader = build_eval_loader(tmp_path, "test", batch_size=3, num_frames=4, img_size=8, num_workers=2)
    keys = [k for _, _, ks in loader for k in ks]
    assert len(keys) == len(set(keys))
    assert must <= set(keys) <= must | may and len(set(keys) & may) < len(may)
    assert loader.stats.corrupt_shards == 1
    assert loader.stats.corrupt >= 3  # the garbage .npy, the sample without .cls, the cut shard
    logged = [r.getMessage() for r in caplog.records]
    assert any("k02" in m for m in logged) and any("k04" in m for m in logged)
    assert any("shard" in m and "test-000001.tar" in m for m in logged)


def test_train_epoch_survives_corruption_with_full_batches(tmp_path, caplog):
    _damaged_dataset(tmp_path)
    caplog.set_level(logging.WARNING, logger="msf_scale.data")
    loader = build_train_loader(tmp_path, batch_size=4, num_frames=4, img_size=8, epoch_samples=64,
                                num_workers=2)
    batches = _epoch(loader)
    assert len(batches) == 16 and all(v.shape[0] == 4 for v, _ in batches)
    assert loader.stats.corrupt > 0
    again = _epoch(loader)
    assert _same(batches, again)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == len(set(messages)), "each corrupt sample or shard is logged once"
