"""Shard schema: write/read round trip, dataset.json handling, and the sample encoding."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from data_helpers import make_dataset

from msf_scale.data import MEAN, STD, build_eval_loader, read_dataset_info
from msf_scale.data.schema import load_npy, make_sample, npy_bytes
from msf_scale.data.streams import ErrorLog, read_samples


def _denormalise(v: torch.Tensor) -> np.ndarray:
    """[3, T, S, S] normalised -> uint8-scale T x S x S x 3 floats."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1, 1), torch.tensor(STD).view(3, 1, 1, 1)
    return ((v * std + mean) * 255).permute(1, 2, 3, 0).numpy()


def test_round_trip_npy_raw_members(toy):
    root, truth = toy
    info = read_dataset_info(root)
    for split in ("train", "test"):
        seen = {}
        for s in read_samples(iter(info.shard_paths(split)), ErrorLog()):
            meta = json.loads(s["json"])
            seen[s["__key__"]] = (int(s["cls"]), load_npy(s["npy"]), meta["label"])
        assert seen.keys() == truth[split].keys()
        for key, (label, video) in truth[split].items():
            assert seen[key][0] == label == seen[key][2]
            np.testing.assert_array_equal(seen[key][1], video)
        assert info.splits[split].num_samples == len(truth[split]) == sum(info.splits[split].shard_samples)


def test_round_trip_through_eval_loader_is_exact(toy):
    """At the stored geometry, the eval view is the stored clip, normalised: every sample and label survives."""
    root, truth = toy
    loader = build_eval_loader(root, "test", batch_size=5, num_frames=6, img_size=16)
    got = {}
    for video, label, keys in loader:
        assert video.shape[1:] == (1, 3, 6, 16, 16) and video.dtype == torch.float32 and label.dtype == torch.int64
        for v, y, k in zip(video, label, keys):
            got[k] = (int(y), _denormalise(v[0]))
    assert got.keys() == truth["test"].keys()
    for key, (label, clip) in truth["test"].items():
        assert got[key][0] == label
        np.testing.assert_allclose(got[key][1], clip, atol=1e-3)


def test_round_trip_mp4(tmp_path):
    truth = make_dataset(tmp_path, {"test": 6}, shard_size=4, fmt="mp4", frames=8, size=32)
    got = {}
    for video, label, keys in build_eval_loader(tmp_path, "test", batch_size=4, num_frames=8, img_size=32):
        for v, y, k in zip(video, label, keys):
            got[k] = (int(y), _denormalise(v[0]))
    assert got.keys() == truth["test"].keys()
    for key, (label, clip) in truth["test"].items():
        assert got[key][0] == label
        assert got[key][1].shape == clip.shape
    info = read_dataset_info(tmp_path)
    assert info.format == "mp4" and info.splits["test"].shard_samples == [4, 2]


def test_read_dataset_info_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*msf-scale data synth"):
        read_dataset_info(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="dataset.json not found"):
        read_dataset_info(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(ValueError, match="lacks the fields"):
        read_dataset_info(tmp_path)


def test_unknown_split_names_available_ones(toy):
    info = read_dataset_info(toy[0])
    with pytest.raises(ValueError, match=r"available: \['test', 'train'\]"):
        info.shard_paths("val")


def test_sample_encoding_checks():
    with pytest.raises(ValueError, match="must not contain"):
        make_sample("a.b", 0, b"", "npy", {})
    with pytest.raises(ValueError, match="uint8"):
        npy_bytes(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="bad npy clip"):
        load_npy(npy_bytes(np.zeros((0, 4, 4, 3), np.uint8)))
