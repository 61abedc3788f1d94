"""The CFD fold: the MCFM's difference term moved into a plain depthwise kernel's centre tap (SPEC.md, MCFM).

Its own module because every fusion backend folds the same way (state_fusion's conv and shift, _fusion_triton,
_fusion_gemm, _fusion_igemm; StateFusion's inference cache), and the fused backends must not import the dispatcher
that imports them.
"""
from __future__ import annotations

import torch


def cfd_kernel(weight: torch.Tensor, theta) -> torch.Tensor:
    """The equivalent plain depthwise kernel: w with theta * (sum of off-centre-frame taps) taken from its centre.
    A plain number 0 returns w itself (nothing to fold: how StateFusion passes kernels it folded already)."""
    if not isinstance(theta, torch.Tensor) and theta == 0:
        return weight
    k = weight.shape[-1]
    c = k // 2
    off_centre = weight.sum(dim=(-1, -2, -3)) - weight[..., c, :, :].sum(dim=(-1, -2))   # [C, 1]
    centre = torch.zeros_like(weight)
    centre[..., c, c, c] = 1.0
    return weight - theta * off_centre[..., None, None, None] * centre
