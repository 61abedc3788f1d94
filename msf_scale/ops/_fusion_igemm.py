"""Multiscale CFD state fusion as implicit GEMMs in Triton: the ``igemm`` backend of :func:`state_fusion`.

Why: the ``gemm`` backend (_fusion_gemm.py) puts the fusion on the tensor cores as batched cuBLAS GEMMs over each
channel's (y, x) plane, but it materialises its operands: an im2col of the input and [k * S, S] block-Toeplitz
bands per channel and scale (~0.5 GB at (32, 384, 8, 14, 14) bf16, again for the backward). On the H200 its GEMMs
took ~1.1 ms of its 7.5 ms; building and copying those buffers most of the rest (docs/BENCHMARKS.md, session 7).
Here the A operand is read in place from one padded copy of the states (staged in shared memory for the tensor
cores); only the banded kernel matrices are built, ~10x smaller than gemm's Toeplitz bands. The states are padded once to [B, C, T, H + 2R, XP] (R: the largest window's radius;
XP = pow2(W + 2R), zero outside the grid, ``Geometry``): for an output row (b, t, y) the 2R + 1 image rows that
any window reads are then one contiguous run of (2R + 1) * XP elements, indexed (o_y, x''). With rows (b, t, y) as
M, the run as K and the output columns x as N:

    forward   F_m[(b, t, y), x] = sum_{o_t} A_{o_t}[(b, t, y), (o_y, x'')] @ Band_m[c, o_t][(o_y, x''), x]
              A_{o_t} = h_padded[b, c, t + o_t - R, y + o_y, x''];  Band_m[o_t][(o_y, x''), x] =
              w_m[o_t - d, o_y - d, x'' - x - d] inside the window (d = R - k_m // 2), else 0
    input     dh = sum_m (the same on dF_m padded, the kernels flipped in t, y and x)
    kernels   Q_m[o_t][x, (o_y, x'')] = sum_{(b, t, y)} dF_m[(b, t, y), x] A_{o_t}[(b, t, y), (o_y, x'')];
              dw_m[o_t - d, o_y - d, e] = sum_x Q_m[o_t][x, (o_y, x + e + d)]  (a diagonal of Q)

``_row_conv`` (forward, input gradient): a program owns one channel and BM output rows; per frame offset it loads
the A tile in K steps of BK columns and multiplies it by the band tiles (gathered once per call into [C, k, NP, XN]
by ``_bands``) with fp32 accumulation (fp64 for fp64). The forward loads each A tile once for every window (the
smaller windows sit inside the largest one's frame); the input gradient sums the windows in one program.
``_tap_grad`` (kernel gradients): a program owns one channel, one frame offset and a slice of the rows; one load of
the shifted states serves every window that reaches that offset; partial sums per row slice are added in torch
(deterministic, no atomics).

The CFD term is folded into the centre tap beforehand (ops/_cfd.cfd_kernel, differentiable, so theta's gradient
comes from autograd through the fold), as every fast backend does. The kernels index a contiguous [B, C, T, H, W]
tensor, no other layout (the model's channels-last view of the states is copied once). The ASWM is StateFusion's
(a 1x1x1 conv and a softmax in torch).

Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (how the CPU tests run it). Under torch.compile the
op is two custom ops (``msf_scale::igemm_fusion`` and its backward; fake impls, autograd registered): the model
traces whole (fullgraph=True), the kernels run as they do in eager.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from msf_scale.ops._cfd import cfd_kernel
from msf_scale.ops._choice import tf32_matmul_allowed

MAX_SCALES = 3
MAX_REACH = 64          # W + 2 R, padded to XP columns (MAX_GRAD_TILE binds first for R >= 1)
MAX_GRAD_TILE = 4096    # _tap_grad's [XN, NP] accumulator per scale: 16 x 256 at 14 x 14, R = 3; larger ones spill
# Tiles: _row_conv (BM rows per program, BK columns per K step; warps, stages; ``flat``: its one-loop variant),
# _tap_grad (BR rows per step; warps, stages; programs aimed at). Chosen by ptxas's count for sm_90 (no spills;
# benchmarks/kernel_resources.py); timed on the lent H100: session 9 (row-band rewrite), session 10 (the flat loop at
# BM 128 / 3 stages and 16384 kernel-gradient programs: fwd+bwd 12.6 -> 10.2 ms; docs/BENCHMARKS.md). The nested
# loop (flat False) wants BM 64 and 2 stages: at BM 128 its input gradient spills.
CONFIG: dict = {"BM": 128, "BK": 32, "warps": 8, "stages": 3, "flat": True,
                "BR": 32, "grad_warps": 8, "grad_stages": 2, "grad_programs": 16384}


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class Geometry:
    """The padded layout both kernels read: states [B, C, T, H + 2R, XP], zero outside the grid, R the largest
    window's radius, XP = pow2(W + 2R) >= 16 columns; the window's image rows o_y = 0 .. 2R of one output row are then
    one contiguous run of (2R + 1) * XP elements, read as NP = pow2 of that columns (the A tile's K axis, (o_y, x''));
    outputs are XN = pow2(W) >= 16 columns wide (the N axis)."""

    def __init__(self, hh: int, ww: int, ks):
        self.r = max(ks) // 2
        self.hp = hh + 2 * self.r
        self.xp = max(16, _pow2(ww + 2 * self.r))
        self.np = _pow2((2 * self.r + 1) * self.xp)
        self.xn = max(16, _pow2(ww))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        r = self.r
        return F.pad(x, (r, self.xp - x.shape[-1] - r, r, r)).contiguous()


_BAND_INDEX: dict = {}


def _band_index(k: int, g: Geometry, ww: int, device, flat: bool) -> torch.Tensor:
    """[k, NP, XN] indices into a window's k^3 taps (k^3: a zero appended): Band[o_t][(o_y, x''), x] = w[o_t, o_y - d,
    x'' - x - d] inside the window, d = R - k // 2 (the window centred in the largest one's frame), x < W. ``flat``:
    [2R + 1, NP, XN], the frame offsets of the largest window too (zero where this one does not reach)."""
    key = (k, g.r, g.xp, g.np, g.xn, ww, str(device), flat)
    if key not in _BAND_INDEX:
        d = g.r - k // 2
        j = torch.arange(2 * g.r + 1 if flat else k)[:, None, None] - (d if flat else 0)
        n = torch.arange(g.np)[None, :, None]
        x = torch.arange(g.xn)[None, None, :]
        oy, ox = n // g.xp - d, n % g.xp - x - d
        inside = ((n < (2 * g.r + 1) * g.xp) & (oy >= 0) & (oy < k) & (ox >= 0) & (ox < k) & (x < ww)
                  & (j >= 0) & (j < k))
        _BAND_INDEX[key] = torch.where(inside, (j * k + oy) * k + ox, k ** 3).to(device)
    return _BAND_INDEX[key]


def _bands(taps, ks, g: Geometry, ww: int, dtype: torch.dtype, flat: bool) -> list[torch.Tensor]:
    """Each window's banded kernel matrices [C, k (flat: 2R + 1), NP, XN] in ``dtype`` (the A tile's; fp32 taps
    rounded here)."""
    out = []
    for w, k in zip(taps, ks):
        padded = torch.cat([w, w.new_zeros(w.shape[0], 1)], dim=1)
        out.append(padded[:, _band_index(k, g, ww, w.device, flat)].to(dtype).contiguous())
    return out


@triton.jit
def _a_tile(x_ptr, c, b, t, y, rmask, n, nmask, C, T, HP, XP: tl.constexpr, OT, R: tl.constexpr):
    """A[row, (o_y, x'')] = x_padded[b, c, t + OT - R, y + o_y, x''] (zero for frames outside the clip)."""
    tt = t + (OT - R)
    m = rmask & (tt >= 0) & (tt < T)
    base = (((b * C + c) * T + tt).to(tl.int64) * HP + y) * XP
    return tl.load(x_ptr + base[:, None] + n[None, :], mask=m[:, None] & nmask[None, :], other=0.0)


@triton.jit
def _band_tile(band_ptr, c, j, n, xo, K: tl.constexpr, NP: tl.constexpr, XN: tl.constexpr):
    return tl.load(band_ptr + ((c * K + j).to(tl.int64) * NP + n[:, None]) * XN + xo[None, :])


@triton.jit
def _store_rows(out_ptr, acc, c, b, t, y, rmask, xo, C, T, H, W):
    base = ((b * C + c) * T + t).to(tl.int64) * (H * W) + y * W
    tl.store(out_ptr + base[:, None] + xo[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & (xo < W)[None, :])


@triton.jit
def _row_conv(x0, x1, x2, b0, b1, b2, o0, o1, o2, C, T, H, W, HP, ROWS,
              SHARED: tl.constexpr, NS: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
              R: tl.constexpr, XP: tl.constexpr, NP: tl.constexpr, XN: tl.constexpr, BM: tl.constexpr,
              BK: tl.constexpr, FLAT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """Depthwise 'same' correlations of padded inputs with banded kernels, per program one channel and BM output
    rows (b, t, y), all x. SHARED (forward): one input x0, every window's output o_m; its A tile per frame offset
    is loaded once for all windows. Otherwise (input gradient): input x_m per window, the sum in o0. Per frame
    offset o_t of the largest window: acc_m += A_{o_t} [BM, NP] @ Band_m[o_t - d_m] [NP, XN], in K steps of BK.
    FLAT: one loop over (o_t, K step) that Triton can pipeline end to end, every window's band in the largest
    window's frames (zero outside its own); else the frame offsets unrolled, each window only where it reaches."""
    pid = tl.program_id(0)
    c = tl.program_id(1)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < ROWS
    y = rows % H
    bt = rows // H
    t = bt % T
    b = bt // T
    xo = tl.arange(0, XN)
    D0: tl.constexpr = R - K0 // 2
    D1: tl.constexpr = R - K1 // 2
    D2: tl.constexpr = R - K2 // 2
    acc0 = tl.zeros((BM, XN), dtype=ACC)
    acc1 = tl.zeros((BM, XN), dtype=ACC)
    acc2 = tl.zeros((BM, XN), dtype=ACC)
    KF: tl.constexpr = 2 * R + 1
    NKC: tl.constexpr = NP // BK
    if FLAT:
        for it in range(KF * NKC):
            ot = it // NKC
            n = (it % NKC) * BK + tl.arange(0, BK)
            nmask = n < KF * XP
            if SHARED:
                a = _a_tile(x0, c, b, t, y, rmask, n, nmask, C, T, HP, XP, ot, R)
                acc0 += tl.dot(a, _band_tile(b0, c, ot, n, xo, KF, NP, XN), input_precision=PREC, out_dtype=ACC)
                if NS >= 2:
                    acc1 += tl.dot(a, _band_tile(b1, c, ot, n, xo, KF, NP, XN), input_precision=PREC,
                                   out_dtype=ACC)
                if NS >= 3:
                    acc2 += tl.dot(a, _band_tile(b2, c, ot, n, xo, KF, NP, XN), input_precision=PREC,
                                   out_dtype=ACC)
            else:   # a window's frames outside its reach: masked loads (no traffic), zero bands
                a = _a_tile(x0, c, b, t, y, rmask & (ot >= D0) & (ot < D0 + K0), n, nmask, C, T, HP, XP, ot, R)
                acc0 += tl.dot(a, _band_tile(b0, c, ot, n, xo, KF, NP, XN), input_precision=PREC, out_dtype=ACC)
                if NS >= 2:
                    a = _a_tile(x1, c, b, t, y, rmask & (ot >= D1) & (ot < D1 + K1), n, nmask, C, T, HP, XP, ot, R)
                    acc0 += tl.dot(a, _band_tile(b1, c, ot, n, xo, KF, NP, XN), input_precision=PREC,
                                   out_dtype=ACC)
                if NS >= 3:
                    a = _a_tile(x2, c, b, t, y, rmask & (ot >= D2) & (ot < D2 + K2), n, nmask, C, T, HP, XP, ot, R)
                    acc0 += tl.dot(a, _band_tile(b2, c, ot, n, xo, KF, NP, XN), input_precision=PREC,
                                   out_dtype=ACC)
    else:
        for ot in tl.static_range(2 * R + 1):
            for kc in range(NP // BK):   # K steps of BK columns (o_y, x''): a loop Triton pipelines
                n = kc * BK + tl.arange(0, BK)
                nmask = n < (2 * R + 1) * XP
                if SHARED:
                    a = _a_tile(x0, c, b, t, y, rmask, n, nmask, C, T, HP, XP, ot, R)
                if (ot >= D0) and (ot < D0 + K0):
                    if not SHARED:
                        a = _a_tile(x0, c, b, t, y, rmask, n, nmask, C, T, HP, XP, ot, R)
                    band = _band_tile(b0, c, ot - D0, n, xo, K0, NP, XN)
                    acc0 += tl.dot(a, band, input_precision=PREC, out_dtype=ACC)
                if NS >= 2 and (ot >= D1) and (ot < D1 + K1):
                    if not SHARED:
                        a = _a_tile(x1, c, b, t, y, rmask, n, nmask, C, T, HP, XP, ot, R)
                    band = _band_tile(b1, c, ot - D1, n, xo, K1, NP, XN)
                    if SHARED:
                        acc1 += tl.dot(a, band, input_precision=PREC, out_dtype=ACC)
                    else:
                        acc0 += tl.dot(a, band, input_precision=PREC, out_dtype=ACC)
                if NS >= 3 and (ot >= D2) and (ot < D2 + K2):
                    if not SHARED:
                        a = _a_tile(x2, c, b, t, y, rmask, n, nmask, C, T, HP, XP, ot, R)
                    band = _band_tile(b2, c, ot - D2, n, xo, K2, NP, XN)
                    if SHARED:
                        acc2 += tl.dot(a, band, input_precision=PREC, out_dtype=ACC)
                    else:
                        acc0 += tl.dot(a, band, input_precision=PREC, out_dtype=ACC)
    _store_rows(o0, acc0, c, b, t, y, rmask, xo, C, T, H, W)
    if SHARED and NS >= 2:
        _store_rows(o1, acc1, c, b, t, y, rmask, xo, C, T, H, W)
    if SHARED and NS >= 3:
        _store_rows(o2, acc2, c, b, t, y, rmask, xo, C, T, H, W)


@triton.jit
def _grad_rows(g_ptr, c, b, t, y, rm, xo, C, T, H, W):
    base = ((b * C + c) * T + t).to(tl.int64) * (H * W) + y * W
    return tl.load(g_ptr + base[:, None] + xo[None, :], mask=rm[:, None] & (xo < W)[None, :], other=0.0)


@triton.jit
def _diagonals(acc, part_ptr, split, c, ot, C, K: tl.constexpr, D: tl.constexpr, XP: tl.constexpr,
               NP: tl.constexpr, XN: tl.constexpr, W):
    """part[split, c, ot - D, o_y - D, e] = sum_x Q[x, (o_y, x + e + D)] for the window's rows o_y and taps e."""
    n = tl.arange(0, NP)
    nx = n % XP
    x = tl.arange(0, XN)
    oy = tl.arange(0, NP // XP)
    out = part_ptr + (((split * C + c) * K + (ot - D)).to(tl.int64) * K + (oy - D)) * K
    om = (oy >= D) & (oy < D + K)
    for e in tl.static_range(K):
        sel = (nx[None, :] == x[:, None] + (e + D)) & (x < W)[:, None]
        v = tl.sum(tl.where(sel, acc, 0.0), axis=0)                  # [NP]: summed over x
        v = tl.sum(tl.reshape(v, (NP // XP, XP)), axis=1)            # [NP // XP]: per window row
        tl.store(out + e, v, mask=om)


@triton.jit
def _tap_grad(hp_ptr, g0, g1, g2, p0, p1, p2, C, T, H, W, HP, NR, CHUNK: tl.constexpr,
              NS: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, R: tl.constexpr,
              XP: tl.constexpr, NP: tl.constexpr, XN: tl.constexpr, BR: tl.constexpr,
              PREC: tl.constexpr, ACC: tl.constexpr):
    """Kernel gradients of every window from rows (b, t, y) [split * CHUNK, +CHUNK) of channel c at frame offset
    o_t of the largest window (program ids: c, o_t, split): Q_m[x, (o_y, x'')] = sum_rows dF_m[row, x]
    h_padded[row shifted by (o_t, o_y), x''] on the tensor cores, the A tile of h shared by the windows that
    reach o_t; each tap is a diagonal of Q_m (_diagonals), written to part_m[split]."""
    c = tl.program_id(0)
    ot = tl.program_id(1)
    split = tl.program_id(2)
    D0: tl.constexpr = R - K0 // 2
    D1: tl.constexpr = R - K1 // 2
    D2: tl.constexpr = R - K2 // 2
    in0 = (ot >= D0) & (ot < D0 + K0)
    in1 = (NS >= 2) & (ot >= D1) & (ot < D1 + K1)
    in2 = (NS >= 3) & (ot >= D2) & (ot < D2 + K2)
    n = tl.arange(0, NP)
    nmask = n < (2 * R + 1) * XP
    xo = tl.arange(0, XN)
    acc0 = tl.zeros((XN, NP), dtype=ACC)
    acc1 = tl.zeros((XN, NP), dtype=ACC)
    acc2 = tl.zeros((XN, NP), dtype=ACC)
    r_start = split * CHUNK
    for step in range(CHUNK // BR):   # CHUNK: a multiple of BR
        rr = r_start + step * BR + tl.arange(0, BR)
        rm = rr < NR
        y = rr % H
        bt = rr // H
        t = bt % T
        b = bt // T
        tt = t + ot - R
        hm = rm & (tt >= 0) & (tt < T)
        base = (((b * C + c) * T + tt).to(tl.int64) * HP + y) * XP
        hv = tl.load(hp_ptr + base[:, None] + n[None, :], mask=hm[:, None] & nmask[None, :], other=0.0)
        if in0:
            acc0 += tl.dot(tl.trans(_grad_rows(g0, c, b, t, y, rm, xo, C, T, H, W)), hv,
                           input_precision=PREC, out_dtype=ACC)
        if in1:
            acc1 += tl.dot(tl.trans(_grad_rows(g1, c, b, t, y, rm, xo, C, T, H, W)), hv,
                           input_precision=PREC, out_dtype=ACC)
        if in2:
            acc2 += tl.dot(tl.trans(_grad_rows(g2, c, b, t, y, rm, xo, C, T, H, W)), hv,
                           input_precision=PREC, out_dtype=ACC)
    if in0:
        _diagonals(acc0, p0, split, c, ot, C, K0, D0, XP, NP, XN, W)
    if in1:
        _diagonals(acc1, p1, split, c, ot, C, K1, D1, XP, NP, XN, W)
    if in2:
        _diagonals(acc2, p2, split, c, ot, C, K2, D2, XP, NP, XN, W)


def supported(h: torch.Tensor, kernels) -> bool:
    """1..3 windows, and a grid row that with the window's reach fits one padded row (MAX_REACH) and one
    kernel-gradient tile (MAX_GRAD_TILE)."""
    if not (h.dim() == 5 and 1 <= len(kernels) <= MAX_SCALES and h.numel() > 0
            and h.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)):
        return False
    g = Geometry(h.shape[3], h.shape[4], [int(w.shape[-1]) for w in kernels])
    return h.shape[4] + 2 * g.r <= MAX_REACH and g.xn * g.np <= MAX_GRAD_TILE


def _precision(dtype: torch.dtype):
    """(accumulator, tl.dot input precision): fp64 for fp64; fp32 IEEE unless TF32 is allowed for matmuls."""
    if dtype == torch.float64:
        return tl.float64, "ieee"
    if dtype == torch.float32:
        return tl.float32, "tf32" if tf32_matmul_allowed() else "ieee"
    return tl.float32, "tf32"   # bf16 / fp16 operands: ignored


def _three(ts):
    return list(ts) + [ts[0]] * (MAX_SCALES - len(ts))   # absent windows: any valid pointer, never read


def _conv(xs, taps, ks, outs, shared: bool):
    """shared: outs[m] = correlate(xs[0], taps[m]); else outs[0] = sum_m correlate(xs[m], taps[m]). One launch;
    xs padded (Geometry.pad), outs [B, C, T, H, W] contiguous."""
    b, c, t, hh, ww = outs[0].shape
    g = Geometry(hh, ww, ks)
    acc, prec = _precision(outs[0].dtype)
    bm = max(16, min(_pow2(CONFIG["BM"]), _pow2(b * t * hh)))   # tl.dot: powers of two, >= 16
    bk = max(16, min(_pow2(CONFIG["BK"]), g.np))
    kk = list(ks) + [1] * (MAX_SCALES - len(ks))
    flat = bool(CONFIG["flat"])
    bands = _bands(taps, ks, g, ww, xs[0].dtype, flat)
    grid = (triton.cdiv(b * t * hh, bm), c)
    _row_conv[grid](*_three(xs), *_three(bands), *_three(outs), c, t, hh, ww, g.hp, b * t * hh, SHARED=shared,
                    NS=len(ks), K0=kk[0], K1=kk[1], K2=kk[2], R=g.r, XP=g.xp, NP=g.np, XN=g.xn, BM=bm, BK=bk,
                    FLAT=flat, PREC=prec, ACC=acc, num_warps=CONFIG["warps"], num_stages=CONFIG["stages"])
    return outs


def _kernel_grads(hp, grads, ks, shape):
    """Every window's dw [C, k^3] (fp32, fp64 for fp64) from the padded states and dF_m (contiguous)."""
    b, c, t, hh, ww = shape
    g = Geometry(hh, ww, ks)
    acc, prec = _precision(hp.dtype)
    br = max(16, _pow2(CONFIG["BR"]))   # tl.dot: a power of two, >= 16
    rows = b * t * hh
    kmax = 2 * g.r + 1
    splits = max(1, min(triton.cdiv(CONFIG["grad_programs"], c * kmax), triton.cdiv(rows, br)))
    chunk = triton.cdiv(triton.cdiv(rows, splits), br) * br
    splits = triton.cdiv(rows, chunk)
    pdt = torch.float64 if hp.dtype == torch.float64 else torch.float32
    parts = [torch.zeros((splits, c, k ** 3), device=hp.device, dtype=pdt) for k in ks]
    kk = list(ks) + [1] * (MAX_SCALES - len(ks))
    _tap_grad[(c, kmax, splits)](hp, *_three(grads), *_three(parts), c, t, hh, ww, g.hp, rows, chunk, NS=len(ks),
                                 K0=kk[0], K1=kk[1], K2=kk[2], R=g.r, XP=g.xp, NP=g.np, XN=g.xn, BR=br, PREC=prec,
                                 ACC=acc, num_warps=CONFIG["grad_warps"], num_stages=CONFIG["grad_stages"])
    return [p.sum(dim=0) for p in parts]


# ---- the op pair torch.compile sees: opaque custom ops (their impls run the Triton kernels outside dynamo's trace),
# with fake impls for shapes and autograd registered on the forward, so a compiled model traces through the fusion
# (fullgraph=True) instead of breaking the graph at every block. Eager runs the same ops.
@torch.library.custom_op("msf_scale::igemm_fusion", mutates_args=())
def _fusion_op(h: torch.Tensor, taps: list[torch.Tensor], ks: list[int]) -> list[torch.Tensor]:
    """(h [B, C, T, H, W] contiguous, plain depthwise kernels as taps [C, k^3] in fp32 (fp64 for fp64 h), windows)
    -> one F_m per kernel, shaped like h."""
    _check_device(h)
    h = h.contiguous()   # the kernels index a contiguous [B, C, T, H, W] layout
    g = Geometry(h.shape[3], h.shape[4], ks)
    return _conv([g.pad(h)], taps, ks, [torch.empty_like(h) for _ in ks], shared=True)


@_fusion_op.register_fake
def _(h, taps, ks):
    return [torch.empty_like(h) for _ in ks]


@torch.library.custom_op("msf_scale::igemm_fusion_backward", mutates_args=())
def _fusion_backward_op(h: torch.Tensor, taps: list[torch.Tensor], ks: list[int], grads: list[torch.Tensor],
                        input_grad: bool) -> list[torch.Tensor]:
    """[dh (empty unless input_grad), dtaps_1, ..., dtaps_M] from the outputs' gradients (zeros for unused ones).
    dh(q) = sum_m sum_p dF_m(q - p) w_m(p): the correlation of dF_m with the flipped kernels, every scale in one
    launch; each kernel's gradient from _tap_grad."""
    c = h.shape[1]
    h, grads = h.contiguous(), [g.contiguous() for g in grads]   # the kernels index contiguous tensors
    geo = Geometry(h.shape[3], h.shape[4], ks)
    gh = h.new_empty(0)
    if input_grad:
        flipped = [w.reshape(c, k, k, k).flip(1, 2, 3).reshape(c, -1).contiguous() for k, w in zip(ks, taps)]
        gh = _conv([geo.pad(g) for g in grads], flipped, ks, [torch.empty_like(h)], shared=False)[0]
    dws = _kernel_grads(geo.pad(h), grads, ks, h.shape)
    return [gh] + [dw.to(w.dtype) for dw, w in zip(dws, taps)]


@_fusion_backward_op.register_fake
def _(h, taps, ks, grads, input_grad):
    return [torch.empty_like(h) if input_grad else h.new_empty(0)] + [torch.empty_like(w) for w in taps]


def _setup_context(ctx, inputs, output):
    h, taps, ks = inputs
    ctx.save_for_backward(h, *taps)
    ctx.ks = ks


def _backward(ctx, grads):
    h, *taps = ctx.saved_tensors
    gfs = [torch.zeros_like(h) if g is None else g.to(h.dtype).contiguous() for g in grads]
    gh, *gtaps = _fusion_backward_op(h, taps, ctx.ks, gfs, ctx.needs_input_grad[0])
    return (gh if ctx.needs_input_grad[0] else None), gtaps, None


_fusion_op.register_autograd(_backward, setup_context=_setup_context)


def _tap_dtype(h: torch.Tensor) -> torch.dtype:
    return torch.float64 if h.dtype == torch.float64 else torch.float32   # rounded to h's dtype in _bands


def _check_device(h: torch.Tensor) -> None:
    if h.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the igemm fusion backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def state_fusion_igemm(h: torch.Tensor, kernels, theta) -> list[torch.Tensor]:
    """The ``igemm`` backend of state_fusion: one fused tensor per kernel, shaped like h. Shapes it does not take
    (more than three windows, a grid row too wide for one kernel-gradient tile: see supported) go to ``gemm``."""
    if not supported(h, kernels):
        from msf_scale.ops._fusion_gemm import state_fusion_gemm
        return state_fusion_gemm(h, kernels, theta)
    ks = [int(w.shape[-1]) for w in kernels]
    c, dtype = h.shape[1], _tap_dtype(h)
    with torch.autocast(h.device.type, enabled=False):   # taps keep fp32 under autocast (rounded in _bands)
        taps = [cfd_kernel(w, theta).reshape(c, -1).to(dtype).contiguous() for w in kernels]
        return _fusion_op(h.contiguous(), taps, ks)
