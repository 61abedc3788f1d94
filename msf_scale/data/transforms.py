"""Clip transforms: temporal sampling, random resized crop, flip, normalisation, and deterministic eval views.

Every random choice comes from a numpy Generator passed in, so that the loader can make augmentation a pure
function of (seed, epoch, rank, batch, position) — the basis of exact resume. Input clips are uint8
F x H x W x 3 numpy arrays; outputs are float32 tensors [3, T, S, S], normalised with ImageNet statistics.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .schema import MEAN, STD

# (x / 255 - mean) / std  ==  x * _INV_STD - _MEAN_OVER_STD, on 0..255 pixels
_INV_STD = 1.0 / (torch.tensor(STD).view(3, 1, 1, 1) * 255.0)
_MEAN_OVER_STD = torch.tensor(MEAN).view(3, 1, 1, 1) / torch.tensor(STD).view(3, 1, 1, 1)


def temporal_indices(num_frames: int, t: int, offsets: np.ndarray | list[float]) -> list[int]:
    """Segment-based sampling: split the clip into ``t`` equal segments, take the frame at fraction
    ``offsets[i]`` in [0, 1) of segment i. Random offsets for training, (c + 0.5) / N for eval clip c of N.
    A clip shorter than ``t`` repeats frames."""
    return [min(num_frames - 1, int((i + float(o)) * num_frames / t)) for i, o in enumerate(offsets)]


def random_indices(num_frames: int, t: int, rng: np.random.Generator) -> list[int]:
    return temporal_indices(num_frames, t, rng.random(t))


def eval_indices(num_frames: int, t: int, clip: int, num_clips: int) -> list[int]:
    return temporal_indices(num_frames, t, [(clip + 0.5) / num_clips] * t)


def random_crop_box(h: int, w: int, rng: np.random.Generator, min_scale: float,
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop covering [min_scale, 1] of the area (Inception-style)."""
    area = h * w
    for _ in range(10):
        a = area * rng.uniform(min_scale, 1.0)
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    s = min(h, w)  # fallback: the central square
    return (h - s) // 2, (w - s) // 2, s, s


def to_tensor(clip: np.ndarray, box: tuple[int, int, int, int], size: int, flip: bool = False,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Crop ``box`` of a uint8 T x H x W x 3 clip, resize to size x size, flip, normalise -> [3, T, S, S].

    Resizing runs on uint8 frames in channels-last layout (torch's vectorised antialiased path, ~5x faster than
    on float); the frames are transposed while still uint8, then converted and normalised in place, into ``out``
    (a slot of the batch tensor) when given, so that batching costs no extra copy."""
    top, left, ch, cw = box
    x = torch.from_numpy(clip[:, top:top + ch, left:left + cw]).permute(0, 3, 1, 2)  # T, 3, h, w (a view)
    if (ch, cw) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if flip:
        x = x.flip(-1)
    x = x.permute(1, 0, 2, 3).contiguous()  # 3, T, S, S uint8
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float32)
    out.copy_(x)
    return out.mul_(_INV_STD).sub_(_MEAN_OVER_STD)


def train_view(clip: np.ndarray, size: int, rng: np.random.Generator, min_scale: float, flip: bool,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Random resized crop (the same box for every frame) and an optional random horizontal flip."""
    box = random_crop_box(clip.shape[1], clip.shape[2], rng, min_scale)
    return to_tensor(clip, box, size, flip=bool(flip and rng.random() < 0.5), out=out)


def eval_crop_boxes(h: int, w: int, num_crops: int) -> list[tuple[int, int, int, int]]:
    """Square crops of the short side, evenly spaced along the long side (1: centre; 3: both ends + centre).

    Equivalent to resizing the short side to the target size and cropping there."""
    s = min(h, w)
    spare = max(h, w) - s
    offs = [spare // 2] if num_crops == 1 else [round(spare * j / (num_crops - 1)) for j in range(num_crops)]
    return [(o, 0, s, s) if h > w else (0, o, s, s) for o in offs]


def eval_views(clips: list[np.ndarray], size: int, num_crops: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """[V, 3, T, S, S] views of the temporal clips (uint8 T x H x W x 3 each), clip-major, V = clips x crops."""
    h, w = clips[0].shape[1:3]
    boxes = eval_crop_boxes(h, w, num_crops)
    if out is None:
        out = torch.empty(len(clips) * len(boxes), 3, clips[0].shape[0], size, size)
    for i, (clip, box) in enumerate((c, b) for c in clips for b in boxes):
        to_tensor(clip, box, size, out=out[i])
    return out
