"""Multiscale CFD state fusion as implicit GEMMs in Triton: the ``igemm`` backend of :func:`state_fusion`.

Why: the ``gemm`` backend (_fusion_gemm.py) puts the fusion on the tensor cores as batched cuBLAS GEMMs over each
channel's (y, x) plane, but it materialises its operands: an im2col of the input and [k * S, S] block-Toeplitz
bands per channel and scale (~0.5 GB at (32, 384, 8, 14, 14) bf16, again for the backward). On the H200 its GEMMs
took ~1.1 ms of its 7.5 ms; building and copying those buffers most of the rest (docs/BENCHMARKS.md, session 7).
Here the same products run with the operands built tile by tile on chip (loaded or gathered into registers, staged
in shared memory for the tensor cores), never as whole buffers in memory:

    forward   F_m[b, c, t, s]  = sum_{o_t, s'} h[b, c, t + o_t - r, s'] * Band_m[c, o_t][s', s]
    input     dh[b, c, t, s']  = sum_m (the same with dF_m and the kernels flipped in t, y and x)
    kernels   dw_m[c, o_t, o_y, o_x] = sum_{b, t, y, x} dF_m[b, c, t, y, x]
                                                     * h[b, c, t + o_t - r, y + o_y - r, x + o_x - r]

``_plane_conv`` (forward, input gradient): a program owns one channel, a tile of rows (b, t) and a tile of output
positions s = (y, x); it loops over frame offsets o_t and over the input positions s' whose image rows can reach
the tile (|y' - y| <= r): the A tile is a plain masked load of h (rows are frames of one clip, s' contiguous), the
band tile Band[s', s] = w[o_t, y' - y + r, x' - x + r] (zero outside the window) is gathered from the channel's
k^3 taps, and tl.dot accumulates in fp32 (fp64 for fp64). The input gradient sums every scale in one program.

``_tap_grad`` (kernel gradients): a program owns one channel and one frame offset o_t (and a slice of the rows
for parallelism); the reduction axis is (b, t, y) and the product is

    Q[x, (o_y, x')] += dF[(b, t, y), x]^T @ h[(b, t + o_t - r, y + o_y - r), x']

with x' running over the window's reach (-r .. W - 1 + r): every tap's gradient is a diagonal sum of Q
(dw[o_t, o_y, o_x] = sum_x Q[x, (o_y, x + o_x - r)]), taken once at the end of the program; partial sums per row
slice are added in torch (deterministic, no atomics).

The CFD term is folded into the centre tap beforehand (ops/_cfd.cfd_kernel, differentiable, so theta's gradient
comes from autograd through the fold), as every fast backend does. The kernels index a contiguous [B, C, T, H, W]
tensor, no other layout (the model's channels-last view of the states is copied once). The ASWM is StateFusion's
(a 1x1x1 conv and a softmax in torch).

Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (how the CPU tests run it). Under torch.compile the
op is two custom ops (``msf_scale::igemm_fusion`` and its backward; fake impls, autograd registered): the model
traces whole (fullgraph=True), the kernels run as they do in eager.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from msf_scale.ops._cfd import cfd_kernel
from msf_scale.ops._choice import tf32_matmul_allowed

MAX_SCALES = 3
MAX_REACH = 64          # W + 2 r: the kernel-gradient tile holds (o_y, x') columns for every window row
# Tiles of _plane_conv (rows, positions, K step; warps, stages) and of _tap_grad (rows per step; warps, stages;
# programs aimed at). Chosen without a GPU by ptxas's count for sm_90 (bf16, (32, 384, 8, 14, 14)): no spills, the
# forward on wgmma (177-186 registers at 8 warps; 4 warps spilled 28-100 bytes), _tap_grad at 168 registers with
# 16-row steps (255 with 32). Not yet timed: benchmarks/bench_fusion.py sweeps them.
CONFIG: dict = {"BM": 64, "BN": 64, "BK": 32, "warps": 8, "stages": 2,
                "BR": 16, "grad_warps": 4, "grad_stages": 2, "grad_programs": 2048}
MAX_GRAD_TILE = 4096    # Q's [XW, AP * XP] accumulator in _tap_grad: 16 x 256 at 14 x 14, k = 7; larger ones spill


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@triton.jit
def _band_dot(acc, x_ptr, w_ptr, c, b, t, rmask, y, xx, n0, nlast, C, T, H, W,
              K: tl.constexpr, NK: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """acc[(b, t), s] += sum_{o_t, s'} x[b, c, t + o_t - R, s'] * w[c, o_t, y' - y + R, x' - x + R] over the
    input rows that reach the tile's positions s (image rows n0 // W - R .. nlast // W + R): at most NK steps of
    BK positions (a constant loop count; the interpreter takes no runtime one)."""
    R: tl.constexpr = K // 2
    S = H * W
    k_lo = tl.maximum(n0 // W - R, 0) * W
    k_hi = tl.minimum(nlast // W + R + 1, H) * W
    wc = w_ptr + c * (K * K * K)
    for j in range(K):
        tt = t + (j - R)
        tm = rmask & (tt >= 0) & (tt < T)
        row = ((b * C + c) * T + tt).to(tl.int64) * S
        for step in range(NK):
            sp = k_lo + step * BK + tl.arange(0, BK)
            spm = sp < k_hi
            a = tl.load(x_ptr + row[:, None] + sp[None, :], mask=tm[:, None] & spm[None, :], other=0.0)
            dy = (sp // W)[:, None] - y[None, :] + R
            dx = (sp % W)[:, None] - xx[None, :] + R
            bm = (dy >= 0) & (dy < K) & (dx >= 0) & (dx < K) & spm[:, None]
            band = tl.load(wc + j * (K * K) + dy * K + dx, mask=bm, other=0.0).to(a.dtype)
            acc += tl.dot(a, band, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _plane_conv(x0, x1, x2, w0, w1, w2, out_ptr, C, T, H, W, ROWS,
                NS: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
                NK0: tl.constexpr, NK1: tl.constexpr, NK2: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """out[b, c, t, s] = sum over the NS (input x_m, kernel w_m) pairs of the depthwise 'same' correlation of x_m
    with w_m (every tensor [B, C, T, H, W] contiguous, kernels [C, K_m^3]). Grid (row tiles, position tiles, C)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    c = tl.program_id(2)
    S = H * W
    rows = pid_m * BM + tl.arange(0, BM)
    rmask = rows < ROWS
    b = rows // T
    t = rows % T
    n0 = pid_n * BN
    s = n0 + tl.arange(0, BN)
    smask = s < S
    y = s // W
    xx = s % W
    nlast = tl.minimum(n0 + BN, S) - 1
    acc = tl.zeros((BM, BN), dtype=ACC)
    acc = _band_dot(acc, x0, w0, c, b, t, rmask, y, xx, n0, nlast, C, T, H, W, K0, NK0, BK, PREC, ACC)
    if NS >= 2:
        acc = _band_dot(acc, x1, w1, c, b, t, rmask, y, xx, n0, nlast, C, T, H, W, K1, NK1, BK, PREC, ACC)
    if NS >= 3:
        acc = _band_dot(acc, x2, w2, c, b, t, rmask, y, xx, n0, nlast, C, T, H, W, K2, NK2, BK, PREC, ACC)
    base = ((b * C + c) * T + t).to(tl.int64) * S
    tl.store(out_ptr + base[:, None] + s[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & smask[None, :])


@triton.jit
def _tap_grad(h_ptr, g_ptr, part_ptr, C, T, H, W, NR, CHUNK: tl.constexpr,
              K: tl.constexpr, XW: tl.constexpr, AP: tl.constexpr, XP: tl.constexpr, BR: tl.constexpr,
              PREC: tl.constexpr, ACC: tl.constexpr):
    """part[split, c, o_t, o_y, o_x] = the kernel gradient from rows (b, t, y) [split * CHUNK, +CHUNK) of channel c
    at frame offset o_t (program ids: c, o_t, split). Q[x, (o_y, x')] = sum_rows dF[row, x] h[row shifted, x']
    accumulates on the tensor cores; each tap is one diagonal of Q."""
    c = tl.program_id(0)
    j = tl.program_id(1)
    split = tl.program_id(2)
    R: tl.constexpr = K // 2
    S = H * W
    x = tl.arange(0, XW)
    xm = x < W
    n = tl.arange(0, AP * XP)
    na = n // XP                  # window row o_y of column n
    nx = n % XP - R               # input column x' of column n
    nm = (na < K) & (nx >= 0) & (nx < W)
    acc = tl.zeros((XW, AP * XP), dtype=ACC)
    r_start = split * CHUNK
    for step in range(CHUNK // BR):   # CHUNK: a multiple of BR
        rr = r_start + step * BR + tl.arange(0, BR)
        rm = rr < NR
        y = rr % H
        bt = rr // H
        t = bt % T
        b = bt // T
        grow = ((b * C + c) * T + t).to(tl.int64) * S + y * W
        g = tl.load(g_ptr + grow[:, None] + x[None, :], mask=rm[:, None] & xm[None, :], other=0.0)
        tt = t + (j - R)
        hrow = ((b * C + c) * T + tt).to(tl.int64) * S
        yy = y[:, None] + (na[None, :] - R)
        hm = (rm & (tt >= 0) & (tt < T))[:, None] & (yy >= 0) & (yy < H) & nm[None, :]
        hv = tl.load(h_ptr + hrow[:, None] + yy * W + nx[None, :], mask=hm, other=0.0)
        acc += tl.dot(tl.trans(g), hv, input_precision=PREC, out_dtype=ACC)
    a_idx = tl.arange(0, AP)
    out = part_ptr + ((split * C + c) * K + j) * (K * K) + a_idx * K
    for e in tl.static_range(K):
        sel = (nx[None, :] == x[:, None] + (e - R)) & xm[:, None]
        v = tl.sum(tl.where(sel, acc, 0.0), axis=0)              # [AP * XP]: summed over x
        v = tl.sum(tl.reshape(v, (AP, XP)), axis=1)              # [AP]: per window row
        tl.store(out + e, v, mask=a_idx < K)


def _grad_tile(w: int, k: int) -> tuple[int, int, int]:
    """(XW, AP, XP) of _tap_grad: rows of Q (x, >= 16), window rows (pow2), reach columns (x', pow2, >= 16)."""
    return max(16, _pow2(w)), _pow2(k), max(16, _pow2(w + 2 * (k // 2)))


def supported(h: torch.Tensor, kernels) -> bool:
    """1..3 windows, and a grid row that with the window's reach fits one kernel-gradient tile (MAX_REACH,
    MAX_GRAD_TILE)."""
    if not (h.dim() == 5 and 1 <= len(kernels) <= MAX_SCALES and h.numel() > 0
            and h.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)):
        return False
    k = max(int(w.shape[-1]) for w in kernels)
    return h.shape[4] + 2 * (k // 2) <= MAX_REACH and math.prod(_grad_tile(h.shape[4], k)) <= MAX_GRAD_TILE


def _precision(dtype: torch.dtype):
    """(accumulator, tl.dot input precision): fp64 for fp64; fp32 IEEE unless TF32 is allowed for matmuls."""
    if dtype == torch.float64:
        return tl.float64, "ieee"
    if dtype == torch.float32:
        return tl.float32, "tf32" if tf32_matmul_allowed() else "ieee"
    return tl.float32, "tf32"   # bf16 / fp16 operands: ignored


def _three(ts):
    return list(ts) + [ts[0]] * (MAX_SCALES - len(ts))   # absent scales: any valid pointer, never read


def _k_steps(hh: int, ww: int, k: int, bn: int, bk: int) -> int:
    """The most K steps of bk input positions any tile of bn output positions needs (as _band_dot bounds them)."""
    s, r, most = hh * ww, k // 2, 0
    for n0 in range(0, s, bn):
        lo = max(n0 // ww - r, 0) * ww
        hi = min((min(n0 + bn, s) - 1) // ww + r + 1, hh) * ww
        most = max(most, -(-(hi - lo) // bk))
    return most


def _conv(xs, ws, ks, out):
    """out = sum_m correlate(xs[m], ws[m]) (one launch; every tensor [B, C, T, H, W] contiguous)."""
    assert all(x.is_contiguous() for x in (*xs, *ws, out)), "the kernels index contiguous tensors"
    b, c, t, hh, ww = out.shape
    acc, prec = _precision(out.dtype)
    bm, bn = min(CONFIG["BM"], max(16, _pow2(b * t))), CONFIG["BN"]   # batch 1: 8 rows fill a 16-row tile
    kk = list(ks) + [0] * (MAX_SCALES - len(ks))
    nk = [_k_steps(hh, ww, k, bn, CONFIG["BK"]) if k else 0 for k in kk]
    grid = (triton.cdiv(b * t, bm), triton.cdiv(hh * ww, bn), c)
    _plane_conv[grid](*_three(xs), *_three(ws), out, c, t, hh, ww, b * t, NS=len(ks), K0=kk[0], K1=kk[1], K2=kk[2],
                      NK0=nk[0], NK1=nk[1], NK2=nk[2], BM=bm, BN=bn, BK=CONFIG["BK"], PREC=prec, ACC=acc,
                      num_warps=CONFIG["warps"], num_stages=CONFIG["stages"])
    return out


def _kernel_grad(h, g, k):
    """dw [C, k^3] (fp32, fp64 for fp64) of one scale from dF = g (both contiguous)."""
    assert h.is_contiguous() and g.is_contiguous(), "the kernels index contiguous tensors"
    b, c, t, hh, ww = h.shape
    acc, prec = _precision(h.dtype)
    br = CONFIG["BR"]
    rows = b * t * hh
    splits = max(1, min(triton.cdiv(CONFIG["grad_programs"], c * k), triton.cdiv(rows, br)))
    chunk = triton.cdiv(triton.cdiv(rows, splits), br) * br
    splits = triton.cdiv(rows, chunk)
    part = torch.empty((splits, c, k ** 3), device=h.device,
                       dtype=torch.float64 if h.dtype == torch.float64 else torch.float32)
    xw, ap, xp = _grad_tile(ww, k)   # tl.dot wants every side >= 16
    _tap_grad[(c, k, splits)](h, g, part, c, t, hh, ww, rows, chunk, K=k, XW=xw, AP=ap, XP=xp, BR=br, PREC=prec,
                              ACC=acc, num_warps=CONFIG["grad_warps"], num_stages=CONFIG["grad_stages"])
    return part.sum(dim=0)


# ---- the op pair torch.compile sees: opaque custom ops (their impls run the Triton kernels outside dynamo's trace),
# with fake impls for shapes and autograd registered on the forward, so a compiled model traces through the fusion
# (fullgraph=True) instead of breaking the graph at every block. Eager runs the same ops.
@torch.library.custom_op("msf_scale::igemm_fusion", mutates_args=())
def _fusion_op(h: torch.Tensor, taps: list[torch.Tensor], ks: list[int]) -> list[torch.Tensor]:
    """(h [B, C, T, H, W] contiguous, plain depthwise kernels as taps [C, k^3] in fp32 (fp64 for fp64 h), windows)
    -> one F_m per kernel, shaped like h."""
    _check_device(h)
    return [_conv([h], [w], (k,), torch.empty_like(h)) for k, w in zip(ks, taps)]


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
    gh = h.new_empty(0)
    if input_grad:
        flipped = [w.reshape(c, k, k, k).flip(1, 2, 3).reshape(c, -1).contiguous() for k, w in zip(ks, taps)]
        gh = _conv(grads, flipped, tuple(ks), torch.empty_like(h))
    return [gh] + [_kernel_grad(h, g, k).to(w.dtype) for k, w, g in zip(ks, taps, grads)]


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
    return torch.float64 if h.dtype == torch.float64 else torch.float32   # rounded to h's dtype in the kernel


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
    with torch.autocast(h.device.type, enabled=False):   # taps keep fp32 under autocast (rounded in the kernel)
        taps = [cfd_kernel(w, theta).reshape(c, -1).to(dtype).contiguous() for w in kernels]
        return _fusion_op(h.contiguous(), taps, ks)
