"""Mamba's causal depthwise conv1d, with a CPU backend: the op before each direction's scan.

x [B, E, L], weight [E, 1, K], bias [E] -> [B, E, L], where output t sees inputs t-K+1..t (zero-padded on the
left). On GPU cuDNN's depthwise conv1d is the fast one; on CPU the same result as K shifted multiply-adds,
because PyTorch's CPU depthwise conv1d backward was ~20% of a CPU training step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    k = weight.shape[-1]
    if x.is_cuda:
        return F.conv1d(x, weight, bias, padding=k - 1, groups=x.shape[1])[..., :x.shape[-1]]
    return _shifted(x, weight, bias)


def _shifted(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The CPU backend: sum over taps i of w[:, i] * x shifted right by K-1-i."""
    k, length = weight.shape[-1], x.shape[-1]
    xp = F.pad(x, (k - 1, 0))
    w = weight[:, 0, :].to(x.dtype)
    out = xp[..., :length] * w[:, 0, None]
    for i in range(1, k):
        out = torch.addcmul(out, xp[..., i:i + length], w[:, i, None])
    return out if bias is None else out + bias.to(x.dtype)[:, None]
