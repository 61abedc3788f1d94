"""A small 3-D CNN: the locality-prior baseline every fine-motion table is read against.

The paper compares MSF-Mamba with CNN families too; this is the smallest member that still sees motion: four
3 x 3 x 3 convolutions (BatchNorm, ReLU), strided to a 2 x 7 x 7 map at 8 x 112 x 112, global average pooling and
a linear head. It shares the model API of :class:`msf_scale.models.MSFMamba` (config dataclass, ``flops_per_clip``,
``no_weight_decay``...) so that train.py, export and the measurement tools treat it like any other variant.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from msf_scale.catalog import CNN3D_SIZES
from msf_scale.models._registry import ModelOptionError, register_model
from msf_scale.models.msf_mamba import MSFMamba
from msf_scale.models.stem import STEM_INPUTS, stem_channels, stem_input
_STRIDES = ((1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2))


@dataclass
class CNN3DConfig:
    variant: str = "cnn3d"
    widths: tuple[int, ...] = CNN3D_SIZES["tiny"]
    num_classes: int = 32
    num_frames: int = 8
    img_size: int = 224
    in_chans: int = 3
    stem_input: str = "rgb"       # [ours] "rgb_diff": the first conv also sees frame differences (models/stem.py),
                                  # so the baseline can be given the same input as an SSM run with that option
    drop_path_rate: float = 0.0   # accepted for train.py's uniform call; a plain CNN has no residual branch to drop
    head_drop: float = 0.0
    grad_checkpointing: bool = False   # accepted like drop_path_rate: nothing to checkpoint in four convolutions

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        if len(self.widths) != len(_STRIDES) or min(self.widths) < 1:
            raise ModelOptionError(f"cnn3d widths must be {len(_STRIDES)} positive channel counts, "
                                   f"got {self.widths}")
        if self.stem_input not in STEM_INPUTS:
            raise ModelOptionError(f"stem_input must be one of {STEM_INPUTS}, got {self.stem_input!r}")


class CNN3D(nn.Module):
    """Video [B, 3, T, H, W] -> conv3d-BN-ReLU x 4 (strided) -> global mean -> dropout -> linear."""

    def __init__(self, cfg: CNN3DConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        fk = {"device": device, "dtype": dtype}
        layers, c_in = [], stem_channels(cfg.in_chans, cfg.stem_input)
        for c_out, stride in zip(cfg.widths, _STRIDES):
            layers += [nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False, **fk),
                       nn.BatchNorm3d(c_out, **fk), nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head_drop = nn.Dropout(cfg.head_drop)
        self.head = nn.Linear(c_in, cfg.num_classes, **fk)

    check_input = MSFMamba.check_input   # the same contract: [B, in_chans, num_frames, img_size, img_size]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.features(stem_input(x, self.cfg.stem_input))   # [B, C, T', H', W']

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=(2, 3, 4)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Nothing to checkpoint: four convolutions. Kept so every variant answers the same calls."""

    def set_backends(self, scan: str | None = None, fusion: str | None = None) -> None:
        """No scan or fusion ops here."""

    def no_weight_decay(self) -> set[str]:
        return set()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def output_grid(self) -> list[tuple[int, int, int]]:
        """(T, H, W) after each conv layer (kernel 3, padding 1)."""
        t, h, w = self.cfg.num_frames, self.cfg.img_size, self.cfg.img_size
        grids = []
        for st, sh, sw in _STRIDES:
            t, h, w = (t - 1) // st + 1, (h - 1) // sh + 1, (w - 1) // sw + 1
            grids.append((t, h, w))
        return grids

    def flops_per_clip(self) -> int:
        """Forward multiply-accumulates for one clip (MAC = 1 FLOP, fvcore's convention): the convolutions and
        the head; BatchNorm folds into the convolution at inference and is not counted."""
        cfg = self.cfg
        macs, c_in = 0, stem_channels(cfg.in_chans, cfg.stem_input)
        for c_out, (t, h, w) in zip(cfg.widths, self.output_grid()):
            macs += t * h * w * c_out * c_in * 27
            c_in = c_out
        return int(macs + c_in * cfg.num_classes)


def build_cnn3d_config(size: str, **overrides) -> CNN3DConfig:
    if size not in CNN3D_SIZES:
        raise ModelOptionError(f"unknown size {size!r}; expected one of {sorted(CNN3D_SIZES)}")
    known = {f.name for f in dataclasses.fields(CNN3DConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ModelOptionError(f"unknown cnn3d option(s): {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
    return CNN3DConfig(**{"widths": CNN3D_SIZES[size], **overrides})


def _create(size: str, device=None, dtype=None, **overrides) -> CNN3D:
    overrides.pop("variant", None)
    return CNN3D(build_cnn3d_config(size, **overrides), device=device, dtype=dtype)


def _register(size: str) -> None:
    def create(**kw) -> CNN3D:
        return _create(size, **kw)
    create.__name__ = create.__qualname__ = f"cnn3d_{size}"
    register_model(create)


for _size in CNN3D_SIZES:
    _register(_size)
