"""The models a user can name: every variant and size, and what each stands for. The one list: the config checks
names against it, the model registry is built from it, and `msf-scale models` tables it.

Imports nothing, so the config (which must not import torch or the models) and the models share it."""
from __future__ import annotations

SIZES = ("tiny", "small", "base")
SSM_VARIANTS = {   # variant -> (CFD fusion scales, ASWM) of the bidirectional-SSM family (SPEC.md, "Variants")
    "videomamba": ((), False),
    "msf_mamba": ((3,), False),
    "msf_mamba_plus": ((3, 5, 7), True),
}
SSM_SIZES = {   # size -> (width d, depth, drop path) (SPEC.md, "Sizes")
    "tiny": (192, 24, 0.1),
    "small": (384, 24, 0.2),
    "base": (576, 32, 0.4),
}
CNN3D_SIZES = {   # size -> channels of the four conv layers (tiny ~0.12M parameters, small ~0.49M, base ~1.17M)
    "tiny": (12, 24, 48, 64),
    "small": (24, 48, 96, 128),
    "base": (32, 64, 128, 256),
}
VARIANTS = (*SSM_VARIANTS, "cnn3d")   # cnn3d: the locality-prior baseline (models/cnn3d.py)
assert set(SSM_SIZES) == set(CNN3D_SIZES) == set(SIZES), "every family comes in every size"
