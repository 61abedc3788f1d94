"""Eval views and the mp4 round trip by value: crop boxes on non-square clips (a square clip cannot tell a
centre crop from a side crop), the pixels each view holds, and decoded frames against the encoded ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from msf_scale.data.schema import MEAN, STD
from msf_scale.data.transforms import eval_crop_boxes, eval_indices, eval_views, random_crop_box, train_view
from msf_scale.data.video import decode_mp4, encode_mp4


def test_eval_crop_boxes_on_non_square_clips():
    # (top, left, height, width): square crops of the short side, both ends and the centre of the long side
    assert eval_crop_boxes(40, 64, 3) == [(0, 0, 40, 40), (0, 12, 40, 40), (0, 24, 40, 40)]
    assert eval_crop_boxes(64, 40, 3) == [(0, 0, 40, 40), (12, 0, 40, 40), (24, 0, 40, 40)]
    assert eval_crop_boxes(40, 64, 1) == [(0, 12, 40, 40)]
    assert eval_crop_boxes(40, 65, 2) == [(0, 0, 40, 40), (0, 25, 40, 40)]
    assert eval_crop_boxes(32, 32, 3) == [(0, 0, 32, 32)] * 3


def _normalise(pixels: np.ndarray) -> torch.Tensor:
    """uint8 T x H x W x 3 -> [3, T, H, W], (x / 255 - mean) / std."""
    x = torch.from_numpy(pixels).double().permute(3, 0, 1, 2) / 255
    return (x - torch.tensor(MEAN, dtype=torch.float64).view(3, 1, 1, 1)) / torch.tensor(STD, dtype=torch.float64).view(3, 1, 1, 1)


def test_eval_views_hold_the_crops_clip_major():
    rng = np.random.default_rng(0)
    clips = [rng.integers(0, 256, (2, 12, 20, 3), dtype=np.uint8) for _ in range(2)]
    views = eval_views(clips, size=12, num_crops=3)          # no resize: each view is its crop, normalised
    assert views.shape == (6, 3, 2, 12, 12)
    for v, (c, left) in enumerate((c, left) for c in range(2) for left in (0, 4, 8)):
        want = _normalise(clips[c][:, :, left:left + 12])
        assert torch.allclose(views[v].double(), want, atol=1e-5), v


def test_eval_indices_take_segment_fractions():
    assert eval_indices(16, 4, 0, 2) == [1, 5, 9, 13]         # fraction 0.25 of each 4-frame segment
    assert eval_indices(16, 4, 1, 2) == [3, 7, 11, 15]        # fraction 0.75
    assert eval_indices(16, 4, 0, 1) == [2, 6, 10, 14]
    assert eval_indices(3, 6, 0, 1) == [0, 0, 1, 1, 2, 2]     # shorter than T: frames repeat


def test_random_crops_cover_a_non_square_frame():
    rng = np.random.default_rng(1)
    boxes = [random_crop_box(30, 70, rng, 0.3) for _ in range(400)]
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 70 and h > 0 and w > 0
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05 or (h, w) == (30, 30)
    assert min(b[1] for b in boxes) == 0 and max(b[1] + b[3] for b in boxes) == 70   # both ends reachable
    clip = rng.integers(0, 256, (2, 30, 70, 3), dtype=np.uint8)
    out = train_view(clip, 16, np.random.default_rng(2), 0.3, flip=False)
    box = random_crop_box(30, 70, np.random.default_rng(2), 0.3)
    crop = torch.from_numpy(clip[:, box[0]:box[0] + box[2], box[1]:box[1] + box[3]]).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(crop, size=(16, 16), mode="bilinear", align_corners=False,
                                              antialias=True).permute(0, 2, 3, 1).numpy()
    assert torch.allclose(out.double(), _normalise(resized), atol=1e-5)


def test_train_flip_mirrors_left_and_right():
    """A flipped training view is the unflipped one mirrored along the width (not the height)."""
    rng = np.random.default_rng(3)
    clip = rng.integers(0, 256, (2, 30, 40, 3), dtype=np.uint8)
    found = set()
    for seed in range(40):
        draw = np.random.default_rng(seed)
        box = random_crop_box(30, 40, draw, 0.5)
        flipped = draw.random() < 0.5                 # train_view draws the box, then the coin
        out = train_view(clip, 16, np.random.default_rng(seed), 0.5, flip=True)
        crop = torch.from_numpy(clip[:, box[0]:box[0] + box[2], box[1]:box[1] + box[3]]).permute(0, 3, 1, 2)
        want = torch.nn.functional.interpolate(crop, size=(16, 16), mode="bilinear", align_corners=False,
                                               antialias=True)
        want = want.flip(-1) if flipped else want
        assert torch.allclose(out.double(), _normalise(want.permute(0, 2, 3, 1).numpy()), atol=1e-5), seed
        found.add(flipped)
        assert torch.equal(train_view(clip, 16, np.random.default_rng(seed), 0.5, flip=False),
                           out if not flipped else out.flip(-1))
    assert found == {True, False}


def _moving_clip(frames=10, h=32, w=48):
    """Smooth frames whose content moves and brightens with time, so that frames differ from one another."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(h), np.arange(w), indexing="ij")
    r = 60 + 12 * t + 40 * np.sin((x + 3 * t) / 6)
    g = 80 + 60 * np.cos(y / 7) + 0 * t
    b = 200 - 10 * t + 20 * np.sin((x + y) / 9)
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def test_mp4_round_trip_keeps_the_pixels():
    video = _moving_clip()
    data = encode_mp4(video, fps=10, crf=12)
    back = decode_mp4(data)
    assert back.shape == video.shape and back.dtype == np.uint8
    err = np.abs(back.astype(int) - video.astype(int))
    # measured mean 2.3, 99th percentile 7 (yuv420p halves the chroma); swapped channels would be ~100 off
    assert err.mean() < 4.0 and np.percentile(err, 99) < 12, (err.mean(), np.percentile(err, 99))
    for i in range(len(video)):                        # frame i decodes nearest to frame i, not to a neighbour
        dists = [np.abs(back[i].astype(int) - v.astype(int)).mean() for v in video]
        assert int(np.argmin(dists)) == i
    picked = decode_mp4(data, [7, 2, 2, 40])
    assert np.array_equal(picked, back[[7, 2, 2, 9]])  # any order, repeats, past the end -> the last frame


def test_mp4_needs_even_sizes():
    with pytest.raises(ValueError, match="even height and width"):
        encode_mp4(np.zeros((2, 31, 32, 3), np.uint8))
