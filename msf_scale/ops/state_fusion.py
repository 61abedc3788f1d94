"""Central-frame-difference (CFD) state fusion, the MCFM's operator, as one function with backends.

For one scale with a depthwise kernel w over a k x k x k window W (SPEC.md, MCFM):

    F(p0) = sum_{p in W} w(p) H(p0 + p)  -  theta * H(p0) * sum_{p in W, p_t != 0} w(p)

i.e. off-centre frames enter as differences from the centre state (for theta = 1), with zero padding at the
grid border. Shapes: h [batch, C, T, H, W]; each kernel [C, 1, k, k, k] (k odd); theta a float or 0-d tensor
(learnable). Returns one fused tensor per kernel, each shaped like h.

Backends (``backend=`` or ``$MSF_SCALE_FUSION_BACKEND``):
    ``torch`` folds the difference term into the kernel's centre tap (the CFD term only ever touches H(p0), which
              is never padded), so each scale is a single depthwise conv3d: exact, one pass, autograd for free.
    ``ref``   :func:`state_fusion_ref`, the equation as written: conv3d minus theta * H * (off-centre weight sum).
A fused kernel replaces ``torch`` here later; on an H100 cuDNN's depthwise conv3d is far off its memory floor.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "ref")
ENV_VAR = "MSF_SCALE_FUSION_BACKEND"


def resolve_backend(backend: str | None) -> str:
    backend = (backend or os.environ.get(ENV_VAR) or "auto").lower()
    if backend not in BACKENDS:
        raise ValueError(f"unknown state-fusion backend {backend!r}; expected one of {BACKENDS}")
    return "torch" if backend == "auto" else backend


def cfd_kernel(weight: torch.Tensor, theta) -> torch.Tensor:
    """The equivalent plain depthwise kernel: w with theta * (sum of off-centre-frame taps) taken from its centre."""
    k = weight.shape[-1]
    c = k // 2
    off_centre = weight.sum(dim=(-1, -2, -3)) - weight[..., c, :, :].sum(dim=(-1, -2))   # [C, 1]
    centre = torch.zeros_like(weight)
    centre[..., c, c, c] = 1.0
    return weight - theta * off_centre[..., None, None, None] * centre


def state_fusion(h: torch.Tensor, kernels: Sequence[torch.Tensor], theta, backend: str | None = "auto"
                 ) -> list[torch.Tensor]:
    _check(h, kernels)
    if resolve_backend(backend) == "ref":
        return state_fusion_ref(h, kernels, theta)
    channels = h.shape[1]
    return [F.conv3d(h, cfd_kernel(w, theta).to(h.dtype), padding=w.shape[-1] // 2, groups=channels)
            for w in kernels]


def state_fusion_ref(h: torch.Tensor, kernels: Sequence[torch.Tensor], theta, backend=None) -> list[torch.Tensor]:
    """The equation term by term, in the input dtype (tests run it in float64)."""
    _check(h, kernels)
    out = []
    for w in kernels:
        k = w.shape[-1]
        agg = F.conv3d(h, w.to(h.dtype), padding=k // 2, groups=h.shape[1])
        off_centre = (w.sum(dim=(-1, -2, -3)) - w[..., k // 2, :, :].sum(dim=(-1, -2))).reshape(1, -1, 1, 1, 1)
        out.append(agg - theta * h * off_centre.to(h.dtype))
    return out


def _check(h: torch.Tensor, kernels: Sequence[torch.Tensor]) -> None:
    if h.dim() != 5:
        raise ValueError(f"h must be [batch, C, T, H, W], got shape {tuple(h.shape)}")
    for w in kernels:
        k = w.shape[-1]
        if tuple(w.shape) != (h.shape[1], 1, k, k, k) or k % 2 == 0:
            raise ValueError(f"each kernel must be [C={h.shape[1]}, 1, k, k, k] with k odd, got {tuple(w.shape)}")
