"""Multiscale CFD state fusion as batched GEMMs on the tensor cores: the ``gemm`` backend of :func:`state_fusion`.

Why: a depthwise k^3 conv has too little arithmetic per loaded value for the tensor cores, and CUDA cores are slow
at it (cuDNN's depthwise conv3d: 46 ms forward + backward for MCFM + ASWM at (32, 384, 8, 14, 14) bf16 on an H200).
Here each channel's (y, x) plane is one matrix axis: for a window frame offset o_t the 2-D part of the kernel is a
[S, S] block-Toeplitz matrix (S = H * W; entry (s', s) = w[o_t, y' - y, x' - x] inside the window, else 0), so

    F_m[c] = A_m[c] @ Band_m[c]      A_m[c] [(t, b), (o_t, s')] = h[b, c, t + o_t, s']   (frames zero-padded)
                                     Band_m[c] [(o_t, s'), s]  = the k_m blocks stacked

one batched GEMM per scale with the channels as the batch (M = T * B rows, K = k * S, N = S). The bands are
mostly zeros (49 of 196 taps a column for k = 7 at 14 x 14), but dense tensor-core MACs are ~15x cheaper than
CUDA-core ones, cuBLAS accumulates in fp32, and nothing is launched per channel. One im2col of the largest window
serves every scale (a smaller window is a K-sub-range of the same matrix). Backward, per channel:

    dh   = [im2col(dF_1) | ... | im2col(dF_m)] @ [Band'_1; ...; Band'_m]     one GEMM over every scale
           (Band' = the band of the frame-reversed kernel, with s and s' swapped)
    dw_m = the diagonals of A_m^T @ dF_m: tap (o_t, o_y, o_x) sums dB[(o_t, s'), s] over the pairs s' - s it maps

As built (_bands), the K side of every band is in reversed spatial order (s~ = S - 1 - s), which makes each block a
Hankel matrix, entry (s~', s) = Q[y~' + y, x~' + x]: symmetric in its two positions, so the swap above costs
nothing (Band' is _bands of the frame-flipped kernels, with dF on the K side in natural order and dh coming out
reversed), and each block is an overlapping strided view of one small canvas Q (no index tensor).

The CFD term is folded into each kernel's centre tap beforehand (ops/_cfd.cfd_kernel, differentiable), as
the conv backend does. Layout: the GEMMs work on [C, T * B, S_pad] (S padded to a multiple of 16 for the tensor
cores' alignment; padded columns stay zero); inputs and outputs are converted from and to [B, C, T, H, W]. The
ASWM runs in that layout too (a [M, M*C] @ [M*C, T*B*S] product, softmax over M, weighted sum) through autograd.
Pure PyTorch: runs on any device (the tests run it in float64 on CPU against ``ref``).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from msf_scale.ops._cfd import cfd_kernel

PAD = 16   # S is padded to a multiple of this (bf16 GEMM operands 16-byte aligned, tensor-core friendly)


def _padded(s: int) -> int:
    return -(-s // PAD) * PAD


@lru_cache(maxsize=32)   # eager: built once; torch.compile traces it (fixed shapes, no data-dependent indexing)
def _tap_positions(h: int, w: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """pos [k*k, S] and its mask: for tap (o_y, o_x) and output position s = (y, x), the flat entry s~' * SP + s of a
    band-shaped [SP, SP] matrix (rows in reversed order s~' = S - 1 - s', columns natural) where the tap meets s,
    with s' = (y + o_y - r, x + o_x - r); masked where s' falls off the grid: to sum a band-shaped gradient back
    onto the taps."""
    r, s, sp = k // 2, h * w, _padded(h * w)
    pos_s = torch.arange(s, device=device)
    oy = torch.arange(k, device=device).view(k, 1, 1)
    ox = torch.arange(k, device=device).view(1, k, 1)
    ys = (pos_s // w).view(1, 1, s) + oy - r
    xs = (pos_s % w).view(1, 1, s) + ox - r
    mask = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    sprime = ys * w + xs
    pos = torch.where(mask, (s - 1 - sprime) * sp + pos_s, torch.zeros_like(sprime))
    return pos.reshape(k * k, s), mask.reshape(k * k, s)


def _bands(wfs, ks, hh: int, ww: int, dtype: torch.dtype) -> torch.Tensor:
    """Plain depthwise kernels [C, 1, k, k, k] -> [C, sum(k) * SP, SP]: each kernel's k bands stacked
    (frame-offset-major), rows in reversed spatial order (s~' = S - 1 - s'), columns natural. Reversing one axis
    makes each band a Hankel matrix, entry (s~', s) = Q[y~' + y, x~' + x] for Q the kernel's frame, flipped, on a
    zero canvas of (2H - 1) x (2W - 1): an overlapping strided view of Q, materialised by one strided copy per
    scale (no index tensor). Padded rows and columns are zero."""
    c, sp, s = wfs[0].shape[0], _padded(hh * ww), hh * ww
    bands = torch.empty((c, sum(ks), sp, sp), device=wfs[0].device, dtype=dtype)
    bands[:, :, s:] = 0
    bands[:, :, :s, s:] = 0
    j = 0
    for k, wf in zip(ks, wfs):
        r = k // 2
        canvas = torch.zeros((c, k, 2 * hh - 1 + 2 * r, 2 * ww - 1 + 2 * r), device=wf.device, dtype=dtype)
        canvas[:, :, hh - 1:hh - 1 + k, ww - 1:ww - 1 + k] = wf.reshape(c, k, k, k).flip(-2, -1).to(dtype)
        sc, sj, sa, _ = canvas.stride()   # Q = canvas[:, :, r:, r:] (a fresh tensor: its offset is r * sa + r)
        hankel = canvas.as_strided((c, k, hh, ww, hh, ww), (sc, sj, sa, 1, sa, 1), r * sa + r)
        bands[:, j:j + k, :s, :s].unflatten(2, (hh, ww)).unflatten(4, (hh, ww)).copy_(hankel)
        j += k
    return bands.reshape(c, sum(ks) * sp, sp)


def _im2col(xp: torch.Tensor, k: int, t: int) -> torch.Tensor:
    """xp [C, T + k - 1, B, SP] (frames zero-padded) -> [C, T * B, k * SP], row (t, b) = frames t .. t + k - 1."""
    xp = xp.contiguous()
    c, _, b, sp = xp.shape
    s0, s1, s2, _ = xp.stride()
    cols = xp.as_strided((c, t, b, k, sp), (s0, s1, s2, s1, 1))
    return cols.reshape(c, t * b, k * sp)


def to_gemm_layout(h: torch.Tensor, pad_t: int = 0, reverse: bool = False) -> torch.Tensor:
    """[B, C, T, H, W] -> [C, T + 2 pad_t, B, SP]: zero frames on both ends, zero columns beyond S; reverse: the
    spatial positions in reversed order (the K side of a Hankel band)."""
    b, c, t, hh, ww = h.shape
    s = hh * ww
    x = h.reshape(b, c, t, s)
    if reverse:
        x = x.flip(-1)
    return F.pad(x.permute(1, 2, 0, 3), (0, _padded(s) - s, 0, 0, pad_t, pad_t))


def from_gemm_layout(f: torch.Tensor, shape, reverse: bool = False) -> torch.Tensor:
    """[C, T * B, SP] -> [B, C, T, H, W] (contiguous); reverse: f holds the spatial positions in reversed order."""
    b, c, t, hh, ww = shape
    x = f.reshape(c, t, b, -1)[..., :hh * ww]
    if reverse:
        x = x.flip(-1)
    return x.permute(2, 0, 1, 3).reshape(b, c, t, hh, ww)


class _ToeplitzFusion(torch.autograd.Function):
    """(h [B, C, T, H, W], plain depthwise kernels [C, 1, k, k, k] ...) -> one F_m [C, T * B, SP] per kernel."""

    @staticmethod
    def forward(ctx, h, ks, *wfs):
        with torch.autocast(h.device.type, enabled=False):   # the operands' dtypes are chosen here, not by autocast
            return _ToeplitzFusion._forward(ctx, h, ks, *wfs)

    @staticmethod
    def _forward(ctx, h, ks, *wfs):
        b, c, t, hh, ww = h.shape
        km = max(ks)
        hp = to_gemm_layout(h, km // 2, reverse=True)
        cols = _im2col(hp, km, t)                       # [C, T*B, km*SP]: every scale's K-range
        sp = hp.shape[-1]
        bands = _bands(wfs, ks, hh, ww, h.dtype)         # [C, sum(k)*SP, SP]
        outs, row = [], 0
        for k in ks:
            off = (km - k) // 2 * sp
            outs.append(torch.bmm(cols[:, :, off:off + k * sp], bands[:, row:row + k * sp]))
            row += k * sp
        ctx.save_for_backward(h, *wfs)
        ctx.ks = ks
        return tuple(outs)

    @staticmethod
    def backward(ctx, *gfs):
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):   # also when called under autocast
            return _ToeplitzFusion._backward(ctx, *gfs)

    @staticmethod
    def _backward(ctx, *gfs):
        h, *wfs = ctx.saved_tensors
        ks = ctx.ks
        b, c, t, hh, ww = h.shape
        km, sp, dev = max(ks), _padded(hh * ww), h.device
        gfs = [g.to(h.dtype).contiguous() for g in gfs]   # unused outputs arrive as zeros (materialised grads)
        gh = gws = None
        if ctx.needs_input_grad[0]:
            # dh = sum over scales and frame offsets of dF shifted back, times the frame-reversed kernels' bands
            # (the same Hankel form with dF's natural order on the K side and dh's reversed order on the N side)
            cols = torch.empty((c, t, b, sum(ks), sp), device=dev, dtype=h.dtype)
            j = 0
            for k, g in zip(ks, gfs):
                gp = F.pad(g.reshape(c, t, b, sp), (0, 0, 0, 0, k // 2, k // 2))
                s0, s1, s2, _ = gp.stride()
                cols[:, :, :, j:j + k] = gp.as_strided((c, t, b, k, sp), (s0, s1, s2, s1, 1))
                j += k
            bands = _bands([wf.flip(2) for wf in wfs], ks, hh, ww, h.dtype)
            g_all = torch.bmm(cols.reshape(c, t * b, -1), bands)                      # [C, T*B, SP], reversed
            gh = from_gemm_layout(g_all, h.shape, reverse=True)
            del cols, bands, g_all   # ~1 GB at (32, 384, 8, 14, 14): not held through the kernels' gradients
        if any(ctx.needs_input_grad[2:]):
            cols = _im2col(to_gemm_layout(h, km // 2, reverse=True), km, t)
            gws = []
            for k, wf, g in zip(ks, wfs, gfs):
                # traced, the cache wrapper is skipped (dynamo would warn on it); the values are shape constants
                tap_positions = _tap_positions.__wrapped__ if torch.compiler.is_compiling() else _tap_positions
                pos, mask = tap_positions(hh, ww, k, dev)
                off = (km - k) // 2 * sp
                db = torch.bmm(cols[:, :, off:off + k * sp].transpose(1, 2), g)          # [C, k*SP, SP]
                acc = torch.float64 if h.dtype == torch.float64 else torch.float32
                vals = db.reshape(c, k, sp * sp)[:, :, pos.reshape(-1)].reshape(c, k, k * k, -1)
                gw = torch.where(mask, vals.to(acc), 0).sum(-1)                         # [C, k, k*k]
                gws.append(gw.reshape(wf.shape).to(wf.dtype))
        return (gh, None, *(gws or [None] * len(wfs)))


def _folded(kernels, theta):
    return [cfd_kernel(w, theta) for w in kernels]


def fused_states_gemm(h: torch.Tensor, kernels, theta) -> list[torch.Tensor]:
    """Every scale's F_m in the GEMM layout [C, T * B, SP] (differentiable)."""
    ks = tuple(int(w.shape[-1]) for w in kernels)
    return list(_ToeplitzFusion.apply(h.contiguous(), ks, *_folded(kernels, theta)))


def state_fusion_gemm(h: torch.Tensor, kernels, theta) -> list[torch.Tensor]:
    """The ``gemm`` backend of state_fusion: one fused tensor per kernel, shaped like h."""
    return [from_gemm_layout(f, h.shape) for f in fused_states_gemm(h, kernels, theta)]


def multiscale_fusion_gemm(h: torch.Tensor, kernels, theta, aswm_weight: torch.Tensor,
                           aswm_bias: torch.Tensor | None) -> torch.Tensor:
    """MCFM + ASWM as StateFusion.forward computes it, the ASWM done in the GEMM layout: logits = A @ cat(F_m)
    (the 1x1x1 conv), softmax over scales in float32 (float64 inputs: float64), out = sum_m alpha_m F_m; one conversion back at the end."""
    fs = fused_states_gemm(h, kernels, theta)
    m, c = len(fs), h.shape[1]
    stacked = torch.stack(fs)                                               # [M, C, T*B, SP]
    wa = aswm_weight.reshape(m, m * c).to(h.dtype)
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    logits = (wa @ stacked.reshape(m * c, -1)).to(acc)                      # [M, T*B*SP]
    if aswm_bias is not None:
        logits = logits + aswm_bias.to(acc)[:, None]
    alpha = torch.softmax(logits, dim=0).to(h.dtype).reshape(m, 1, *fs[0].shape[1:])
    out = (alpha * stacked).sum(0)
    return from_gemm_layout(out, h.shape)
