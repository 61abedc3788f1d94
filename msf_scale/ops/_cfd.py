"""The CFD fold: the MCFM's difference term moved into a plain depthwise kernel's centre tap (SPEC.md, MCFM).

Its own module because every fusion backend folds the same way (state_fusion's conv and shift, _fusion_triton,
_fusion_gemm, _fusion_igemm; StateFusion's inference cache), and the fused backends must not import the dispatcher
that imports them.
"""
from __future__ import annotations

import torch


def cfd_kernel(weight: torch.Tensor, theta) -> torch.Tensor:
    """The equivalent plain depthwise kernel: w with theta * (sum of off-centre-frame taps) taken from its centre.
    A plain number 0 returns w itself (nothing to fold: how StateFusion passes kernels it folded already).

    Written with slices and a concatenation only, no tensor constructor (zeros_like plus a scatter): Inductor's freezing
    folds no op downstream of a constructor, so the constructor form ran the fold as a kernel in every frozen forward
    (one or two a fused block in session 19's profiles); this one folds into a constant."""
    if not isinstance(theta, torch.Tensor) and theta == 0:
        return weight
    k = weight.shape[-1]
    c = k // 2
    off_centre = weight.sum(dim=(-1, -2, -3)) - weight[..., c, :, :].sum(dim=(-1, -2))   # [C, 1]
    flat = weight.flatten(-3)                                                           # [C, 1, k^3]
    at = (c * k + c) * k + c                                                            # the centre tap
    centre = flat[..., at:at + 1] - theta * off_centre[..., None]
    return torch.cat([flat[..., :at], centre, flat[..., at + 1:]], dim=-1).view(weight.shape)
