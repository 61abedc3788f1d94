"""Multiscale CFD state fusion by FFT: the ``fft`` backend of :func:`state_fusion` (issue 19, item 1).

Why: a depthwise k^3 window costs k^3 multiply-adds a value directly (495 for the scales 3, 5, 7 together) but a
product in the frequency domain costs one complex multiply a frequency and scale, whatever k: the transforms,
not the taps, carry the cost, and they are memory-bound library calls (cuFFT / pocketfft). One forward transform
of the states serves every scale; each scale's output is one inverse transform of a product.

A 'same' depthwise cross-correlation over a window of radius r = k // 2, zero-padded at the border, equals a
circular one on a grid of N >= n + r frames (rows, columns) per axis with the states zero beyond n: an index
x + d (|d| <= r) that leaves [0, n) lands in the zeros on either side. One N per axis serves every scale (the
largest r), chosen with small prime factors (``fft_size``) so the transforms stay fast:

    F_m = irfftn( rfftn(h, N) * conj(rfftn(P_m, N)) )[:T, :H, :W]

with P_m the folded kernel (the CFD term moved into its centre tap, ops/_cfd.cfd_kernel, as every other backend
does) placed at offsets d mod N. The transforms run in float32 (float64 for float64 inputs: the tests compare
against ``ref`` there), so a bf16 state loses nothing beyond its own rounding. The ASWM (1x1x1 conv over the
concatenated F_m, softmax over scales, weighted sum) is computed on the float32 F_m; the output is cast back to
the input's dtype. Gradients (input, every kernel, theta, the ASWM's weight and bias) come from autograd through
the transforms: each is again one transform per tensor.
Pure PyTorch: runs on any device.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from msf_scale.ops._cfd import cfd_kernel

_DIMS = (-3, -2, -1)


def fft_size(n: int) -> int:
    """The smallest m >= n whose prime factors are 2, 3, 5 or 7 (fast sizes for cuFFT and pocketfft)."""
    m = max(int(n), 1)
    while True:
        rest = m
        for p in (2, 3, 5, 7):
            while rest % p == 0:
                rest //= p
        if rest == 1:
            return m
        m += 1


def grid_sizes(shape, ks) -> tuple[int, int, int]:
    """N per axis for a [.., T, H, W] state and windows ks: n + the largest radius, rounded up to a fast size."""
    r = max(ks) // 2
    return tuple(fft_size(n + r) for n in shape[-3:])


def kernel_spectra(kernels, theta, sizes, dtype: torch.dtype) -> torch.Tensor:
    """conj(rfftn(P_m)) for every scale, [M, C, N_t, N_h, N_w // 2 + 1] complex: the folded kernels placed at
    offsets d mod N (tap j of a k-window at d = j - k // 2). Differentiable in the kernels and theta. Built from
    pads, slices and concatenations only, so that frozen compiled inference folds it into a constant (as cfd_kernel)."""
    spectra = []
    for w in kernels:
        k, r = w.shape[-1], w.shape[-1] // 2
        folded = cfd_kernel(w, theta).to(dtype)[:, 0]                            # [C, k, k, k]
        placed = F.pad(folded, (0, sizes[2] - k, 0, sizes[1] - k, 0, sizes[0] - k))
        for dim in _DIMS:   # roll by -r with slices (torch.roll's index constructor would stop Inductor's folding)
            placed = torch.cat([placed.narrow(dim, r, placed.shape[dim] - r), placed.narrow(dim, 0, r)], dim=dim)
        spectra.append(torch.fft.rfftn(placed, dim=_DIMS).conj())
    return torch.stack(spectra)


def fft_dtype(h: torch.Tensor) -> torch.dtype:
    """The transforms' dtype for states h: float64 for float64, else float32."""
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def fused_states_fft(h: torch.Tensor, kernels, theta, spectra: torch.Tensor | None = None) -> torch.Tensor:
    """Every scale's F_m stacked, [M, B, C, T, H, W] in float32 (float64 for float64 h). ``spectra``: a cached
    kernel_spectra (inference: the kernels do not change between calls)."""
    ks = [int(w.shape[-1]) for w in kernels]
    sizes = grid_sizes(h.shape, ks)
    acc = fft_dtype(h)
    if spectra is None:
        spectra = kernel_spectra(kernels, theta, sizes, acc)
    states = torch.fft.rfftn(h.to(acc), s=sizes, dim=_DIMS)                    # [B, C, N_t, N_h, N_w // 2 + 1]
    full = torch.fft.irfftn(states.unsqueeze(0) * spectra.unsqueeze(1), s=sizes, dim=_DIMS)
    t, hh, ww = h.shape[-3:]
    return full[..., :t, :hh, :ww]


def state_fusion_fft(h: torch.Tensor, kernels, theta) -> list[torch.Tensor]:
    """The ``fft`` backend of state_fusion: one fused tensor per kernel, shaped and typed like h."""
    return [f.to(h.dtype) for f in fused_states_fft(h, kernels, theta).unbind(0)]


def multiscale_fusion_fft(h: torch.Tensor, kernels, theta, aswm_weight: torch.Tensor,
                          aswm_bias: torch.Tensor | None, spectra: torch.Tensor | None = None) -> torch.Tensor:
    """MCFM + ASWM as StateFusion.forward computes it: logits = the 1x1x1 conv over cat(F_m) (channel-major, scale
    by scale), softmax over scales, out = sum_m alpha_m F_m; in float32 on the transforms' output, cast back to h's
    dtype once."""
    fs = fused_states_fft(h, kernels, theta, spectra)                           # [M, B, C, T, H, W]
    m, c = fs.shape[0], fs.shape[2]
    with torch.autocast(h.device.type, enabled=False):   # autocast would run both einsums as bf16 matmuls
        wa = aswm_weight.reshape(m, m, c).to(fs.dtype)                          # [out scale, in scale, C]
        logits = torch.einsum("omc,mbcthw->bothw", wa, fs)
        if aswm_bias is not None:
            logits = logits + aswm_bias.to(fs.dtype).view(1, m, 1, 1, 1)
        alpha = torch.softmax(logits, dim=1)                                    # [B, M, T, H, W]
        out = torch.einsum("bmthw,mbcthw->bcthw", alpha, fs)
    return out.to(h.dtype)
