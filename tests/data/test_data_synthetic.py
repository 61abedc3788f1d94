"""Synthetic micro-gestures: reproducible, cached, subject-split, and learnable from motion but not one frame."""
from __future__ import annotations

import filecmp

import numpy as np
import pytest
import torch

from msf_scale.data import SynthConfig, ensure_synthetic, generate_split, read_dataset_info, synthesize
from msf_scale.data.synthetic import synth_config

SMALL = dict(train_per_class=3, test_per_class=2, num_frames=4, size=16, shard_size=7)


def _shards_equal(a, b) -> bool:
    ia, ib = read_dataset_info(a), read_dataset_info(b)
    names = [s for v in ia.splits.values() for s in v.shards]
    return names == [s for v in ib.splits.values() for s in v.shards] and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def test_same_seed_same_bytes_other_seed_other_clips(tmp_path):
    a = synthesize(tmp_path / "a", seed=5, **SMALL)
    b = synthesize(tmp_path / "b", seed=5, **SMALL)
    c = synthesize(tmp_path / "c", seed=6, **SMALL)
    assert _shards_equal(a, b)
    assert not _shards_equal(a, c)
    info = read_dataset_info(a)
    assert info.splits["train"].num_samples == 8 * 3 and info.splits["test"].num_samples == 8 * 2
    assert info.flip_ok is False and info.num_frames == 4 and info.height == info.width == 16


def test_splits_use_disjoint_subjects_and_balanced_classes():
    cfg = SynthConfig(train_per_class=6, test_per_class=4, num_frames=2, size=8, object_px=3)
    _, ytr, str_ = generate_split(cfg, "train")
    _, yte, ste = generate_split(cfg, "test")
    assert not set(str_.tolist()) & set(ste.tolist())
    assert len(set(ste.tolist())) == cfg.test_subjects
    assert np.bincount(ytr).tolist() == [6] * 8 and np.bincount(yte).tolist() == [4] * 8


def test_ensure_synthetic_generates_once_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("MSF_SCALE_CACHE", str(tmp_path / "cache"))
    root = ensure_synthetic(**SMALL)
    assert root.parent == tmp_path / "cache" and root.name.startswith("synth-")
    stamp = (root / "dataset.json").stat().st_mtime_ns
    assert ensure_synthetic(**SMALL) == root
    assert (root / "dataset.json").stat().st_mtime_ns == stamp, "the cached dataset must be reused"
    other = ensure_synthetic(cache_dir=tmp_path / "elsewhere", **(SMALL | {"seed": 1}))
    assert other.parent == tmp_path / "elsewhere" and other.name != root.name


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown synthetic-data options.*valid"):
        synth_config(motion=3)
    with pytest.raises(ValueError, match="num_classes"):
        SynthConfig(num_classes=13)
    with pytest.raises(ValueError, match="test_subjects"):
        SynthConfig(subjects=4, test_subjects=4)


# --------------------------------------------------------------------------------- learnability (default config)
R = 3  # shifts searched by the motion feature, px (the default moves 1.6-2.4 px per frame, drift <= 0.5)


def _gray(videos: np.ndarray) -> np.ndarray:
    g = videos.astype(np.float32).mean(-1)
    return g - g.mean(axis=(-2, -1), keepdims=True)


def _xcorr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum_x a(x) b(x - s) for every shift s in [-R, R]^2 (periodic), flattened per clip."""
    c = np.fft.irfft2(np.fft.rfft2(a) * np.conj(np.fft.rfft2(b)), s=a.shape[-2:])
    c = np.roll(c, (R, R), axis=(-2, -1))[..., : 2 * R + 1, : 2 * R + 1]
    c = c.reshape(len(a), -1)
    return c / (np.abs(c).mean(1, keepdims=True) + 1e-6)


def difference_feature(videos: np.ndarray) -> np.ndarray:
    """Each frame difference correlated with its frame: peaks at the displacement of what moved."""
    g = _gray(videos)
    return np.concatenate([_xcorr(g[:, t + 1] - g[:, t], g[:, t]) for t in range(g.shape[1] - 1)], axis=1)


def _accuracy(xtr, ytr, xte, yte, hidden: int = 32, steps: int = 100) -> float:
    """Held-out accuracy of a small MLP, full-batch AdamW."""
    torch.manual_seed(0)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (torch.tensor((x - mu) / sd, dtype=torch.float32) for x in (xtr, xte))
    ytr, yte = torch.tensor(ytr), torch.tensor(yte)
    model = torch.nn.Sequential(torch.nn.Linear(xtr.shape[1], hidden), torch.nn.ReLU(),
                                torch.nn.Linear(hidden, int(ytr.max()) + 1))
    opt = torch.optim.AdamW(model.parameters(), 1e-2, weight_decay=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(xtr), ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (model(xte).argmax(1) == yte).float().mean().item()


@pytest.fixture(scope="module")
def default_splits():
    cfg = SynthConfig()
    return generate_split(cfg, "train"), generate_split(cfg, "test"), 1.0 / cfg.num_classes


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: extra threads only contend on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class FrameNet(torch.nn.Module):
    """A small CNN on one frame: global max/mean features (what appears, anywhere) plus a coarse spatial map (where).

    Measured while writing this test: it finds an object colour, position or size that depends on the class
    (held-out accuracy 0.27-0.42 for leaks planted in the generator) yet stays at chance on the real one."""

    def __init__(self, num_classes: int, size: int, width: int = 16):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, width, 3, padding=1)
        self.c2 = torch.nn.Conv2d(width, width, 3, padding=1, stride=2)
        self.where = torch.nn.Linear(width * (size // 4) ** 2, num_classes)
        self.what = torch.nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        pooled = torch.nn.functional.avg_pool2d(h, 2).flatten(1)
        return self.where(pooled) + self.what(torch.cat([h.amax((2, 3)), h.mean((2, 3))], 1))


def _frame_cnn_accuracy(vtr, ytr, vte, yte, epochs: int = 15, batch: int = 128, frame: int | None = None) -> float:
    """Held-out accuracy of FrameNet trained on one frame of each clip (default: the middle one)."""
    def middle(v):
        return torch.tensor(v[:, v.shape[1] // 2 if frame is None else frame]).permute(0, 3, 1, 2).float() / 255.0

    torch.manual_seed(0)
    xtr, xte, ytr_t = middle(vtr), middle(vte), torch.tensor(ytr)
    model = FrameNet(int(ytr.max()) + 1, xtr.shape[-1])
    opt = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(xtr)).split(batch):
            loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr_t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (model(xte).argmax(1).numpy() == yte).mean()


def test_default_is_not_learnable_from_one_frame(default_splits):
    (vtr, ytr, _), (vte, yte, _), chance = default_splits
    acc = _frame_cnn_accuracy(vtr, ytr, vte, yte)
    # 320 test clips: chance +- 1.9 points (one std); 7 points is well outside noise
    assert acc < chance + 0.07, f"one frame predicts the class: {acc:.3f} on held-out subjects vs chance {chance:.3f}"


def test_default_is_learnable_from_frame_differences(default_splits):
    (vtr, ytr, _), (vte, yte, _), chance = default_splits
    acc = _accuracy(difference_feature(vtr), ytr, difference_feature(vte), yte)
    assert acc > 0.8, f"frame-difference feature reaches only {acc:.3f} on held-out subjects (chance {chance:.3f})"
