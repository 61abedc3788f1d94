"""Token stems: how a video becomes the token grid the bidirectional SSM scans.

``patch`` is VideoMamba's (and SPEC.md's default): one linear projection of each p x p patch of each tubelet.
``conv`` is a small convolutional stem in the manner of Xiao et al., "Early convolutions help transformers see
better" (2021): log2(p) stride-2 3 x 3 convolutions (BatchNorm, ReLU) that double the width up to d, then a 1 x 1
projection, so every token is built from overlapping local filters instead of one linear map of its own pixels.
With ``temporal_kernel=3`` those filters also span neighbouring frames, so a token sees local motion directly.
An [ours] option (the paper says "a 3-D convolution" for the embedding); measured in docs/BENCHMARKS.md, "Fine motion".
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from msf_scale.models._registry import ModelOptionError
from msf_scale.ops._choice import env_choice

# The patch embedding's form in a compiled forward without autograd on CUDA (read at import): "gemm" (patchify_linear;
# the default) or "conv" (cuDNN). Why not cuDNN there: at batch 1 it runs this 3-channel, 16 x 16-strided
# conv as a generic implicit-GEMM kernel, 0.12 ms a forward at every size on the lent H100 (session 16's profiles:
# ~6% of videomamba tiny), where as one [T'H'W', 3 x k] x [3 x k, d] GEMM it is a few microseconds by arithmetic.
# Measured (H100, session 17, batch-1 compiled, conv -> gemm in one call): msf_mamba_plus tiny 3.36 -> 3.24 ms,
# videomamba base 5.22 -> 5.05, msf_mamba base 6.16 -> 5.97 (3.1-3.6%); hence the default.
def patch_embed_compiled_form(environ=os.environ) -> str:
    """$MSF_SCALE_PATCH_EMBED_COMPILED: "gemm" (the default) or "conv"."""
    return env_choice("MSF_SCALE_PATCH_EMBED_COMPILED", ("conv", "gemm"), "gemm", environ)


PATCH_EMBED_COMPILED_FORM = patch_embed_compiled_form()


STEM_INPUTS = ("rgb", "rgb_diff")


def stem_input(x: torch.Tensor, kind: str) -> torch.Tensor:
    """What the first layer sees: the clip (``rgb``, the paper's), or ``rgb_diff`` [ours]: the clip and each frame
    minus the previous one (3 more channels, zero for the first frame), where a static background cancels."""
    if kind == "rgb_diff":
        return torch.cat([x, torch.diff(x, dim=2, prepend=x[:, :, :1])], dim=1)
    return x


def stem_channels(in_chans: int, kind: str) -> int:
    """Channels of :func:`stem_input`'s output: the difference doubles them."""
    return in_chans * (2 if kind == "rgb_diff" else 1)


def patchify_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    kernel: tuple[int, int, int]) -> torch.Tensor:
    """F.conv3d(x, weight, bias, stride=kernel) for a kernel equal to its stride, as one GEMM: the non-overlapping
    tubelets flattened into rows [B, T'H'W', C kt kh kw] times the flattened weight (remainders dropped, as the
    conv does). Same sums, another order."""
    kt, kh, kw = kernel
    b, c, t, h, w = x.shape
    nt, nh, nw = t // kt, h // kh, w // kw
    x = x[:, :, :nt * kt, :nh * kh, :nw * kw]
    rows = x.reshape(b, c, nt, kt, nh, kh, nw, kw).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, nt * nh * nw, -1)
    out = F.linear(rows, weight.reshape(weight.shape[0], -1), bias)            # [B, T'H'W', d]
    return out.view(b, nt, nh, nw, -1).permute(0, 4, 1, 2, 3)                 # [B, d, T', H', W'], as the conv


class PatchEmbed(nn.Conv3d):
    """VideoMamba's tubelet embedding: a Conv3d whose stride is its kernel (the same parameters and state_dict keys),
    run as patchify_linear in a compiled CUDA forward without autograd (MSF_SCALE_PATCH_EMBED_COMPILED=gemm, the
    default)."""

    def __init__(self, in_chans: int, dim: int, kernel: tuple[int, int, int], device=None, dtype=None):
        super().__init__(in_chans, dim, kernel, stride=kernel, device=device, dtype=dtype)

    def gemm_form(self, x: torch.Tensor) -> bool:
        return (PATCH_EMBED_COMPILED_FORM == "gemm" and x.is_cuda and torch.compiler.is_compiling()
                and not torch.is_grad_enabled())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemm_form(x):
            return patchify_linear(x, self.weight, self.bias, self.kernel_size)
        return super().forward(x)


class ConvStem(nn.Module):
    """[B, 3, T, H, W] -> [B, d, T, H/p, W/p] through log2(p) strided convolutions and a 1 x 1 projection."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, temporal_kernel: int = 1, device=None, dtype=None):
        super().__init__()
        n = int(round(math.log2(patch_size)))
        if 2 ** n != patch_size or n < 1:
            raise ModelOptionError(f"the conv stem needs a power-of-two patch_size >= 2, got {patch_size}")
        if temporal_kernel not in (1, 3):
            raise ModelOptionError(f"stem_temporal_kernel must be 1 or 3, got {temporal_kernel}")
        fk = {"device": device, "dtype": dtype}
        widths = [max(dim // 2 ** (n - 1 - i), 8) for i in range(n)]
        layers, c_in = [], in_chans
        kt = temporal_kernel
        for c_out in widths:
            layers += [nn.Conv3d(c_in, c_out, (kt, 3, 3), stride=(1, 2, 2), padding=(kt // 2, 1, 1), bias=False, **fk),
                       nn.BatchNorm3d(c_out, **fk), nn.ReLU(inplace=True)]
            c_in = c_out
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv3d(c_in, dim, 1, **fk)
        self.widths, self.temporal_kernel, self.in_chans = widths, kt, in_chans

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(x))

    def flops(self, t: int, h: int, w: int) -> int:
        """Forward multiply-accumulates at input (t, h, w) (BatchNorm folds into the conv; not counted)."""
        macs, c_in = 0, self.in_chans
        for c_out in self.widths:
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
            macs += t * h * w * c_out * c_in * self.temporal_kernel * 9
            c_in = c_out
        return macs + t * h * w * c_in * self.proj.out_channels
