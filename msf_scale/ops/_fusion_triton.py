"""Fused multiscale CFD state fusion (+ ASWM) in Triton: the ``triton`` backend of :func:`state_fusion`.

What it computes (SPEC.md, MCFM and ASWM), for up to three odd windows k_m at once:

    F_m = depthwise_conv3d_same(h, w'_m),   w'_m = cfd_kernel(w_m, theta)   (the CFD term folded into the centre tap)
    ASWM (optional): alpha = softmax_m(sum_{m, c} A[j, m*C + c] F_m[c] + a[j]),   out = sum_m alpha_m F_m

The fold is done in torch on the tiny kernels (differentiable, so theta's and the raw kernels' gradients come from
autograd through :func:`cfd_kernel`); the kernels below see plain depthwise weights and return their gradients.

Kernel design ("band" / Toeplitz form, tensor cores). For one channel, the rows of a tile are the (t, y) pairs of
BT frames x BH rows (H padded to a power of two) and the columns are x (W padded to >= 16). For a window offset
(o_t, o_y) the x-part of the convolution is a [W, W] band matrix  B[x', x] = w'[o_t, o_y, x' - x + r], so

    F[(t, y), :] += h[(t + o_t, y + o_y), :] @ B_{o_t, o_y}           (forward: one tl.dot per (o_t, o_y, scale))
    dh[(t, y), :] += dF[(t - o_t, y - o_y), :] @ B_{o_t, o_y}^T         (input gradient)
    dB_{o_t, o_y} = h[(t + o_t, y + o_y), :]^T @ dF                     (weight gradient; its diagonals are dw')

The loops over window rows (o_t, o_y) are runtime loops: fully unrolled 7 x 7 bodies measured 255 registers plus
2.5-3.8 KB of spill stack per thread and 60-150 s compiles (ptxas, sm_90); as loops no kernel spills for bf16/fp16.
Three forward variants: by default one loop per scale (one accumulator live, every scale reloads its row-shifted [rows,
16] tiles from L1/L2); shared (``CONFIG["fwd_shared"]``), the 49 tiles of the largest window are loaded once and feed
every scale whose window holds that row (the issue's "one loaded 7^3 neighbourhood"; runtime branches, 3 accumulators);
stacked (``CONFIG["fwd_stack"]``, precedence over shared), the scales' bands side by side so each of those rows is one
product for every scale. The band matrices are gathered from the taps in registers. At batch 1 BATCH1_FORWARD fills what
CONFIG leaves None (shared or stacked by width, 4 warps, frame blocks of 4, ``_alpha``). Accumulation is fp32 (fp64 for
fp64 inputs); bf16/fp16 operands go to the tensor cores as they are (the band is rounded to the input dtype, as the
``conv`` backend rounds its kernel); fp32 operands use IEEE fp32 dots (tf32 only when
``torch.backends.cuda.matmul.allow_tf32`` is set).

Launches. Forward: ``_fwd`` (program = batch x channel group (16 channels with ASWM) x frame block: every scale of
every channel in the group, F_m stored in the input dtype, the ASWM logits summed over the group in registers and
atomically added across groups into a zeroed fp32 [B, M, T, H, W]), the softmax on those logits (torch, tiny) and
``_combine`` (out = sum alpha_m F_m); at batch 1 (BATCH1_FORWARD) one channel a program, the logits stored per channel
and summed by ``_alpha`` with the bias and the softmax in one launch. Backward: with ASWM ``_aswm_dot`` (s_m = sum_c
dout F_m, atomics across channel groups), the softmax backward on [B, M, T, H, W] (torch, tiny), ``_aswm_grad`` (dF_m =
alpha_m dout + sum_j A[j, m*C + c] dlogit_j, and per-(batch, block) partials of the 1x1 conv's weight gradient); then
``_bwd`` (program = batch group x channel x frame block, the tile's rows stacking ``bwd_batch`` batch elements: dh, and
every tap's gradient, summed over the tile's rows, as partials [n_groups * n_tb, C, sum k^3] that torch sums over
the first axis: a two-stage, deterministic reduction, no weight atomics).

Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter; how the tests run it).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from msf_scale.ops._cfd import cfd_kernel
from msf_scale.ops._choice import tf32_matmul_allowed

MAX_SCALES = 3
# Launch settings of the two heavy kernels, (num_warps, num_stages); None: the defaults in _Geom (no spills on sm_90 by
# ptxas's count for bf16/fp16/fp32), at batch 1 in 16-bit BATCH1_FORWARD's forward (4, 1). benchmarks/bench_fusion.py
# --sweep times alternatives by setting these.
# "bwd_batch": batch elements per backward tile (None: 2 where a tile of one has <= 128 rows).
# "fwd_shared": True loads each row-shifted tile of the largest window once for every scale (runtime branches
# per scale), False/None: one loop per scale (reloads, no branches).
# "aswm_group": channels per program of the ASWM forward and of _aswm_dot (None: 16).
# "fwd_frames": frames per forward program (None: as many as fit 128 rows, at batch 1 BATCH1_FORWARD's 4; fewer give
# more programs at batch 1).
# "fwd_loop_stages" / "fwd_unroll": the forward's window-row loop's software-pipelining depth and unroll factor
# (tl.range's num_stages / loop_unroll_factor; None: Triton's defaults, the kernel's num_stages and no unrolling).
# "logit_partials": the ASWM logits stored per channel group and summed in torch, instead of atomics into one buffer.
# "alpha_kernel": the ASWM weights (the logit partials' sum, the bias, the softmax) in one launch (_alpha) instead of
# torch's four; "alpha_tile": its (partial slices, positions) per load, powers of two (None: (64, 16)). Session 17 timed
# a one-kernel form with 13 programs (slower than torch); this one has THW / 16 (session 18).
# "fwd_stack": every scale's band side by side, one product per window row of the largest window (49 at 3/5/7)
# where the shared form issues one per scale and row (83); takes precedence over fwd_shared (session 18).
# A direct-convolution forward for small batches was built and timed in session 17: 2.1-2.9x slower than this band
# form at batch 1 (docs/BENCHMARKS.md), removed. So was session 21's K-stacked forward (every window row of a frame
# offset along the product's K axis: 7 products a channel at 3/5/7 instead of 49): 0.84 / 0.75 / 0.74x this form at
# 192 / 384 / 576 channels (its best setting 0.87 / 0.87 / 0.84x): the forward is not bound by its serial steps.
# "out_tokens": with ASWM and no autograd, the output written token-major ([B, T, H, W, C] memory; the _combine_tokens
# kernel; the op returns it so and the callers index it [B, C, T, H, W], channels_last_3d strides), so that the
# block's residual add and the next pre-norm read it along rows instead of transposed. A layout the compiled graph
# holds: set it before compiling. (The autograd path reads CONFIG's value; None there: channel-major.)
# "fwd_pad_input": without autograd, the stacked / shared forward reads a zero-padded copy of its input (pad_input:
# halo frames and rows, rows padded to BW), made by the padding op that replaces the contiguous copy in front of the
# op, so a row-shifted tile is one unmasked load of aligned rows (a vector load), not masked element loads (the
# compiled window-row loop: 193 -> 119 PTX instructions a thread and step, sm_90).
# Both are BATCH1_FORWARD's defaults since session 21 (timed there); a band table read at a fixed offset pattern
# instead of the taps' gather (83 instructions) timed 0.79x at 192 channels and no faster in the model: removed.
COMBINE_TOKENS_BLOCK = (32, 32)   # _combine_tokens' (channels, positions) a program (untimed)
CONFIG: dict = {"fwd": None, "bwd": None, "bwd_batch": None, "fwd_shared": None, "aswm_group": None,
                "fwd_frames": None, "fwd_loop_stages": None, "fwd_unroll": None, "logit_partials": None,
                "fwd_stack": None, "alpha_kernel": None, "alpha_tile": None, "out_tokens": None,
                "fwd_pad_input": None}


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ----------------------------------------------------------------------------------------------- Triton kernels

@triton.jit
def _diag_sums(d, xi, xj, ev, K: tl.constexpr):
    """s[e] = sum over x' - x + K//2 == e of d[x', x] (d [BW, BW]) -> [KP]: the depthwise taps' gradient."""
    onehot = (xi[:, None, None] - xj[None, :, None] + K // 2) == ev[None, None, :]
    return tl.sum(tl.sum(tl.where(onehot, d[:, :, None], 0.0), axis=1), axis=0)


@triton.jit
def _fwd_scale(h_ptr, base, wc, t, y, x, xi, xj, T, H, W, acc, K: tl.constexpr, PREC: tl.constexpr,
               ACC: tl.constexpr, STAGES: tl.constexpr = None, UNROLL: tl.constexpr = None):
    """acc += one channel's depthwise 'same' conv with a K^3 kernel (wc: its taps), as K^2 row-shifted tiles times
    [BW, BW] band matrices B[x', x] = w[o_t, o_y, x' - x + K//2]. A runtime loop (not unrolled): registers stay
    at one iteration's tiles and Triton pipelines the loads."""
    R: tl.constexpr = K // 2
    e = xi[:, None] - xj[None, :] + R
    em = (e >= 0) & (e < K)
    xm = x < W
    for d in tl.range(K * K, num_stages=STAGES, loop_unroll_factor=UNROLL):
        tt = t + (d // K - R)
        yy = y + (d % K - R)
        m = (tt >= 0) & (tt < T) & (yy >= 0) & (yy < H)
        a = tl.load(h_ptr + base + (tt * (H * W) + yy * W)[:, None] + x[None, :], mask=m[:, None] & xm[None, :],
                    other=0.0)
        bd = tl.load(wc + d * K + e, mask=em, other=0.0).to(a.dtype)
        acc += tl.dot(a, bd, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _shared_tap(acc, a, wc, ot, oy, xi, xj, K: tl.constexpr, KM: tl.constexpr, PREC: tl.constexpr,
                ACC: tl.constexpr):
    """acc += a @ B for the window row (ot, oy) of a K^3 kernel when that row is in its window (|ot|, |oy| <= K//2)."""
    R: tl.constexpr = K // 2
    e = xi[:, None] - xj[None, :] + R
    if K == KM:   # the largest window holds every row
        bd = tl.load(wc + ((ot + R) * K + oy + R) * K + e, mask=(e >= 0) & (e < K), other=0.0).to(a.dtype)
        acc += tl.dot(a, bd, input_precision=PREC, out_dtype=ACC)
    else:
        if (ot >= -R) & (ot <= R) & (oy >= -R) & (oy <= R):
            bd = tl.load(wc + ((ot + R) * K + oy + R) * K + e, mask=(e >= 0) & (e < K), other=0.0).to(a.dtype)
            acc += tl.dot(a, bd, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _row_tile(h_ptr, base, t, y, x, d, T, H, W, KM: tl.constexpr, PADIN: tl.constexpr = False,
              BH: tl.constexpr = 1, BW: tl.constexpr = 1):
    """Row d of the largest window's KM x KM (frame, row) offsets: (o_t, o_y) and the row-shifted tile
    h[(t + o_t, y + o_y), x] (zero outside the grid), as the shared and stacked forwards walk them. PADIN: h is the
    zero-padded input (pad_input: [.., T', BH + KM - 1, BW] a channel, KM // 2 halo frames and rows), so the tile is
    one unmasked load of whole aligned rows (vector loads) instead of masked element loads."""
    ot = d // KM - KM // 2
    oy = d % KM - KM // 2
    if PADIN:
        row = (t + ot + KM // 2) * (BH + KM - 1) + y + oy + KM // 2
        a = tl.load(h_ptr + base + row[:, None] * BW + x[None, :])
    else:
        tt = t + ot
        yy = y + oy
        m = (tt >= 0) & (tt < T) & (yy >= 0) & (yy < H)
        a = tl.load(h_ptr + base + (tt * (H * W) + yy * W)[:, None] + x[None, :], mask=m[:, None] & (x < W)[None, :],
                    other=0.0)
    return ot, oy, a


@triton.jit
def _fwd_shared(h_ptr, base, wc, t, y, x, xi, xj, T, H, W, acc0, acc1, acc2, NS: tl.constexpr, K0: tl.constexpr,
                K1: tl.constexpr, K2: tl.constexpr, OFF1: tl.constexpr, OFF2: tl.constexpr, KM: tl.constexpr,
                PREC: tl.constexpr, ACC: tl.constexpr, STAGES: tl.constexpr = None, UNROLL: tl.constexpr = None,
                PADIN: tl.constexpr = False, BH: tl.constexpr = 1, BW: tl.constexpr = 1):
    """Every scale from one loaded neighbourhood: the KM^2 row-shifted tiles of the largest window are loaded once
    and each feeds the band of every scale whose window holds that row (the other variant reloads per scale)."""
    for d in tl.range(KM * KM, num_stages=STAGES, loop_unroll_factor=UNROLL):
        ot, oy, a = _row_tile(h_ptr, base, t, y, x, d, T, H, W, KM, PADIN, BH, BW)
        acc0 = _shared_tap(acc0, a, wc, ot, oy, xi, xj, K0, KM, PREC, ACC)
        if NS >= 2:
            acc1 = _shared_tap(acc1, a, wc + OFF1, ot, oy, xi, xj, K1, KM, PREC, ACC)
        if NS >= 3:
            acc2 = _shared_tap(acc2, a, wc + OFF2, ot, oy, xi, xj, K2, KM, PREC, ACC)
    return acc0, acc1, acc2


@triton.jit
def _fwd_stacked(h_ptr, base, wc, t, y, x, xi, T, H, W, acc, NS: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr,
                 K2: tl.constexpr, OFF1: tl.constexpr, OFF2: tl.constexpr, KM: tl.constexpr, BW: tl.constexpr,
                 NSP: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, STAGES: tl.constexpr = None,
                 UNROLL: tl.constexpr = None, PADIN: tl.constexpr = False, BH: tl.constexpr = 1):
    """Every scale in one product per window row: the bands of the scales side by side, [BW, NSP * BW] (column
    m * BW + x: scale m's output column x; zero where the row is outside scale m's window, and for m >= NS), so a
    row costs one tl.dot where the shared form issues one per scale. acc: [rows, NSP * BW]."""
    col = tl.arange(0, NSP * BW)
    m = col // BW
    xc = col % BW
    k = tl.where(m == 0, K0, tl.where(m == 1, K1, K2))
    r = k // 2
    off = tl.where(m == 0, 0, tl.where(m == 1, OFF1, OFF2))
    e = xi[:, None] - xc[None, :] + r[None, :]
    em = (e >= 0) & (e < k[None, :]) & (m < NS)[None, :]
    for d in tl.range(KM * KM, num_stages=STAGES, loop_unroll_factor=UNROLL):
        ot, oy, a = _row_tile(h_ptr, base, t, y, x, d, T, H, W, KM, PADIN, BH, BW)
        inwin = (ot >= -r) & (ot <= r) & (oy >= -r) & (oy <= r)   # [NSP * BW]: this row in scale m's window
        tap = off + ((ot + r) * k + oy + r) * k
        bd = tl.load(wc + tap[None, :] + e, mask=em & inwin[None, :], other=0.0).to(a.dtype)
        acc += tl.dot(a, bd, input_precision=PREC, out_dtype=ACC)
    return acc


@triton.jit
def _add_logits(lg0, lg1, lg2, acc, a_ptr, stride, NS: tl.constexpr, ACC: tl.constexpr):
    """lg_j += A[j, m*C + c] * F_m[c] for j < NS (a_ptr points at A[0, m*C + c]; stride: A's row length)."""
    lg0 += tl.load(a_ptr).to(ACC) * acc
    if NS >= 2:
        lg1 += tl.load(a_ptr + stride).to(ACC) * acc
    if NS >= 3:
        lg2 += tl.load(a_ptr + 2 * stride).to(ACC) * acc
    return lg0, lg1, lg2


@triton.jit
def _scale_sum(v, ROWS: tl.constexpr, NSP: tl.constexpr, BW: tl.constexpr):
    """[rows, NSP * BW] -> [rows, BW]: the stacked scales' column blocks summed."""
    return tl.sum(tl.reshape(v, (ROWS, NSP, BW)), axis=1)


@triton.jit
def _add_stacked_logits(lg0, lg1, lg2, acc, a_ptr, a_m, stride, NS: tl.constexpr, ROWS: tl.constexpr,
                        NSP: tl.constexpr, BW: tl.constexpr, ACC: tl.constexpr):
    """_add_logits for the stacked accumulator: lg_j += sum_m A[j, m*C + c] * F_m[c], where a_ptr [NSP * BW] points
    at A[0, m*C + c] for each column's scale m (a_m: m < NS)."""
    lg0 += _scale_sum(acc * tl.load(a_ptr, mask=a_m, other=0.0).to(ACC)[None, :], ROWS, NSP, BW)
    if NS >= 2:
        lg1 += _scale_sum(acc * tl.load(a_ptr + stride, mask=a_m, other=0.0).to(ACC)[None, :], ROWS, NSP, BW)
    if NS >= 3:
        lg2 += _scale_sum(acc * tl.load(a_ptr + 2 * stride, mask=a_m, other=0.0).to(ACC)[None, :], ROWS, NSP, BW)
    return lg0, lg1, lg2


@triton.jit
def _frame_tile(BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """A forward program's tile: rows = BT frames x BH rows of frame block program_id(1), columns x: (t, y, x)."""
    rows = tl.arange(0, BT * BH)
    return tl.program_id(1) * BT + rows // BH, rows % BH, tl.arange(0, BW)


@triton.jit
def _store_partials(logit_ptr, lbase, thw, own, own_m, lg0, lg1, lg2, NS: tl.constexpr):
    """One slice of the logit partials: lg_j at logit_ptr + lbase + j * thw (+ own positions), j < NS."""
    tl.store(logit_ptr + lbase + own, lg0, mask=own_m)
    if NS >= 2:
        tl.store(logit_ptr + lbase + thw + own, lg1, mask=own_m)
    if NS >= 3:
        tl.store(logit_ptr + lbase + 2 * thw + own, lg2, mask=own_m)


@triton.jit
def _fwd(h_ptr, w_ptr, f0_ptr, f1_ptr, f2_ptr, aw_ptr, logit_ptr, C, T, H, W, n_cg,
         NS: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
         OFF1: tl.constexpr, OFF2: tl.constexpr, KTOT: tl.constexpr, KM: tl.constexpr,
         CG: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
         ASWM: tl.constexpr, SHARE: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
         STAGES: tl.constexpr, UNROLL: tl.constexpr, PARTIALS: tl.constexpr, STACK: tl.constexpr = False,
         NSP: tl.constexpr = 1, PADIN: tl.constexpr = False):
    """F_m for every scale of the CG channels of one group, one frame block; with ASWM the group's partial logits
    (registers), atomically added across groups (PARTIALS: stored per group instead, [n_cg, B, NS, T, H, W], for
    torch to sum). Program = (b * n_cg + group, frame block). STACK: every scale's band side by side in one product
    per window row (_fwd_stacked; NSP = NS rounded up to a power of two)."""
    pid = tl.program_id(0)
    b = pid // n_cg
    cg = pid % n_cg
    t, y, x = _frame_tile(BT, BH, BW)
    xi = tl.arange(0, BW)
    xj = tl.arange(0, BW)
    thw = T * H * W
    own_m = ((t < T) & (y < H))[:, None] & (x < W)[None, :]
    own = (t * (H * W) + y * W)[:, None] + x[None, :]
    lg0 = tl.zeros((BT * BH, BW), dtype=ACC)
    lg1 = tl.zeros((BT * BH, BW), dtype=ACC)
    lg2 = tl.zeros((BT * BH, BW), dtype=ACC)
    scol = tl.arange(0, NSP * BW)   # the stacked form's columns: scale scol // BW, x = scol % BW
    sm = scol // BW
    own_s = (t * (H * W) + y * W)[:, None] + (scol % BW)[None, :]
    own_sm = ((t < T) & (y < H))[:, None] & (scol % BW < W)[None, :]
    for ci in range(CG):
        c = cg * CG + ci
        base = (b * C + c).to(tl.int64) * thw
        hbase = base
        if PADIN:   # the padded input's channel: (frame blocks x BT + 2 halo) frames of BH + KM - 1 rows of BW
            hbase = (b * C + c).to(tl.int64) * ((tl.num_programs(1) * BT + KM - 1) * (BH + KM - 1) * BW)
        wc = w_ptr + c * KTOT
        if STACK:
            acc = _fwd_stacked(h_ptr, hbase, wc, t, y, x, xi, T, H, W, tl.zeros((BT * BH, NSP * BW), dtype=ACC),
                               NS, K0, K1, K2, OFF1, OFF2, KM, BW, NSP, PREC, ACC, STAGES, UNROLL, PADIN, BH)
            tl.store(f0_ptr + base + own_s, acc.to(f0_ptr.dtype.element_ty), mask=own_sm & (sm == 0)[None, :])
            if NS >= 2:
                tl.store(f1_ptr + base + own_s, acc.to(f1_ptr.dtype.element_ty), mask=own_sm & (sm == 1)[None, :])
            if NS >= 3:
                tl.store(f2_ptr + base + own_s, acc.to(f2_ptr.dtype.element_ty), mask=own_sm & (sm == 2)[None, :])
            if ASWM:
                lg0, lg1, lg2 = _add_stacked_logits(lg0, lg1, lg2, acc, aw_ptr + sm * C + c, sm < NS, NS * C, NS,
                                                    BT * BH, NSP, BW, ACC)
        elif SHARE:
            acc0, acc1, acc2 = _fwd_shared(h_ptr, hbase, wc, t, y, x, xi, xj, T, H, W,
                                           tl.zeros((BT * BH, BW), dtype=ACC), tl.zeros((BT * BH, BW), dtype=ACC),
                                           tl.zeros((BT * BH, BW), dtype=ACC), NS, K0, K1, K2, OFF1, OFF2, KM,
                                           PREC, ACC, STAGES, UNROLL, PADIN, BH, BW)
            tl.store(f0_ptr + base + own, acc0.to(f0_ptr.dtype.element_ty), mask=own_m)
            if ASWM:
                lg0, lg1, lg2 = _add_logits(lg0, lg1, lg2, acc0, aw_ptr + c, NS * C, NS, ACC)
            if NS >= 2:
                tl.store(f1_ptr + base + own, acc1.to(f1_ptr.dtype.element_ty), mask=own_m)
                if ASWM:
                    lg0, lg1, lg2 = _add_logits(lg0, lg1, lg2, acc1, aw_ptr + C + c, NS * C, NS, ACC)
            if NS >= 3:
                tl.store(f2_ptr + base + own, acc2.to(f2_ptr.dtype.element_ty), mask=own_m)
                if ASWM:
                    lg0, lg1, lg2 = _add_logits(lg0, lg1, lg2, acc2, aw_ptr + 2 * C + c, NS * C, NS, ACC)
        else:   # one runtime loop per scale (only one accumulator live; each scale reloads its tiles, from L1/L2)
            acc = _fwd_scale(h_ptr, base, wc, t, y, x, xi, xj, T, H, W, tl.zeros((BT * BH, BW), dtype=ACC),
                             K0, PREC, ACC, STAGES, UNROLL)
            tl.store(f0_ptr + base + own, acc.to(f0_ptr.dtype.element_ty), mask=own_m)
            if ASWM:   # logits_j += A[j, m*C + c] * F_m[c]: this group's channels summed in registers
                lg0, lg1, lg2 = _add_logits(lg0, lg1, lg2, acc, aw_ptr + c, NS * C, NS, ACC)
            if NS >= 2:
                acc = _fwd_scale(h_ptr, base, wc + OFF1, t, y, x, xi, xj, T, H, W,
                                 tl.zeros((BT * BH, BW), dtype=ACC), K1, PREC, ACC, STAGES, UNROLL)
                tl.store(f1_ptr + base + own, acc.to(f1_ptr.dtype.element_ty), mask=own_m)
                if ASWM:
                    lg0, lg1, lg2 = _add_logits(lg0, lg1, lg2, acc, aw_ptr + C + c, NS * C, NS, ACC)
            if NS >= 3:
                acc = _fwd_scale(h_ptr, base, wc + OFF2, t, y, x, xi, xj, T, H, W,
                                 tl.zeros((BT * BH, BW), dtype=ACC), K2, PREC, ACC, STAGES, UNROLL)
                tl.store(f2_ptr + base + own, acc.to(f2_ptr.dtype.element_ty), mask=own_m)
                if ASWM:
                    lg0, lg1, lg2 = _add_logits(lg0, lg1, lg2, acc, aw_ptr + 2 * C + c, NS * C, NS, ACC)
    if ASWM:
        if PARTIALS:   # this group's own slice: plain stores, summed over groups in torch
            lbase = ((cg * (tl.num_programs(0) // n_cg) + b) * NS).to(tl.int64) * thw   # [group, b, NS] slice
            _store_partials(logit_ptr, lbase, thw, own, own_m, lg0, lg1, lg2, NS)
        else:
            lbase = (b * NS).to(tl.int64) * thw
            tl.atomic_add(logit_ptr + lbase + own, lg0, mask=own_m)
            if NS >= 2:
                tl.atomic_add(logit_ptr + lbase + thw + own, lg1, mask=own_m)
            if NS >= 3:
                tl.atomic_add(logit_ptr + lbase + 2 * thw + own, lg2, mask=own_m)


@triton.jit
def _combine(f0_ptr, f1_ptr, f2_ptr, alpha_ptr, out_ptr, C, THW, NS: tl.constexpr, BLOCK: tl.constexpr,
             ACC: tl.constexpr):
    """out[b, c] = sum_m alpha[b, m] * F_m[b, c]; program = (b * C + c, block of positions)."""
    pid = tl.program_id(0)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = p < THW
    b = pid // C
    base = pid.to(tl.int64) * THW + p
    abase = (b * NS).to(tl.int64) * THW + p
    out = tl.load(alpha_ptr + abase, mask=m, other=0.0).to(ACC) * tl.load(f0_ptr + base, mask=m, other=0.0).to(ACC)
    if NS >= 2:
        out += (tl.load(alpha_ptr + abase + THW, mask=m, other=0.0).to(ACC)
                * tl.load(f1_ptr + base, mask=m, other=0.0).to(ACC))
    if NS >= 3:
        out += (tl.load(alpha_ptr + abase + 2 * THW, mask=m, other=0.0).to(ACC)
                * tl.load(f2_ptr + base, mask=m, other=0.0).to(ACC))
    tl.store(out_ptr + base, out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _combine_tokens(f0_ptr, f1_ptr, f2_ptr, alpha_ptr, out_ptr, C, THW, NS: tl.constexpr, CB: tl.constexpr,
                    P: tl.constexpr, ACC: tl.constexpr):
    """_combine writing out token-major: out[b, p, c] (memory [B, THW, C]) = sum_m alpha[b, m, p] F_m[b, c, p];
    program = (b, block of P positions, block of CB channels): F_m read as [CB, P] tiles along positions, out
    stored along channels (Triton moves the tile between the two orders)."""
    b = tl.program_id(0)
    p = tl.program_id(1) * P + tl.arange(0, P)
    c = tl.program_id(2) * CB + tl.arange(0, CB)
    m = (c < C)[:, None] & (p < THW)[None, :]
    f_off = (b * C + c).to(tl.int64)[:, None] * THW + p[None, :]
    a_off = (b * NS).to(tl.int64) * THW + p
    out = (tl.load(alpha_ptr + a_off, mask=p < THW, other=0.0).to(ACC)[None, :]
           * tl.load(f0_ptr + f_off, mask=m, other=0.0).to(ACC))
    if NS >= 2:
        out += (tl.load(alpha_ptr + a_off + THW, mask=p < THW, other=0.0).to(ACC)[None, :]
                * tl.load(f1_ptr + f_off, mask=m, other=0.0).to(ACC))
    if NS >= 3:
        out += (tl.load(alpha_ptr + a_off + 2 * THW, mask=p < THW, other=0.0).to(ACC)[None, :]
                * tl.load(f2_ptr + f_off, mask=m, other=0.0).to(ACC))
    o_off = (b * THW + p).to(tl.int64)[None, :] * C + c[:, None]
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _alpha(logit_ptr, bias_ptr, alpha_ptr, B, THW, N_PART: tl.constexpr, NS: tl.constexpr, HAS_BIAS: tl.constexpr,
           G: tl.constexpr, P: tl.constexpr, ACC: tl.constexpr):
    """The ASWM weights from the forward's logits in one launch: alpha[b, :, p] = softmax_m(sum over the N_PART
    slices of logit partials [N_PART, B, NS, THW] + bias). Program = (block of P positions, b); each loads G slices
    at once, [G, P] tiles (torch's way is four launches: sum, bias add, softmax and a copy). N_PART is a constexpr
    (C at batch 1): one compile per width, the loop over slices unrolled (9 steps at 576 channels with G = 64)."""
    b = tl.program_id(1)
    p = tl.program_id(0) * P + tl.arange(0, P)
    pm = p < THW
    gi = tl.arange(0, G)
    l0 = tl.zeros((P,), dtype=ACC)
    l1 = tl.zeros((P,), dtype=ACC)
    l2 = tl.zeros((P,), dtype=ACC)
    for g0 in tl.static_range(0, N_PART, G):
        gg = g0 + gi
        m = (gg < N_PART)[:, None] & pm[None, :]
        off = ((gg * B + b) * NS).to(tl.int64)[:, None] * THW + p[None, :]
        l0 += tl.sum(tl.load(logit_ptr + off, mask=m, other=0.0), axis=0)
        if NS >= 2:
            l1 += tl.sum(tl.load(logit_ptr + off + THW, mask=m, other=0.0), axis=0)
        if NS >= 3:
            l2 += tl.sum(tl.load(logit_ptr + off + 2 * THW, mask=m, other=0.0), axis=0)
    if HAS_BIAS:
        l0 += tl.load(bias_ptr).to(ACC)
        if NS >= 2:
            l1 += tl.load(bias_ptr + 1).to(ACC)
        if NS >= 3:
            l2 += tl.load(bias_ptr + 2).to(ACC)
    top = l0
    if NS >= 2:
        top = tl.maximum(top, l1)
    if NS >= 3:
        top = tl.maximum(top, l2)
    e0 = tl.exp(l0 - top)
    total = e0
    if NS >= 2:
        e1 = tl.exp(l1 - top)
        total += e1
    if NS >= 3:
        e2 = tl.exp(l2 - top)
        total += e2
    out = alpha_ptr + (b * NS).to(tl.int64) * THW + p
    tl.store(out, e0 / total, mask=pm)
    if NS >= 2:
        tl.store(out + THW, e1 / total, mask=pm)
    if NS >= 3:
        tl.store(out + 2 * THW, e2 / total, mask=pm)


@triton.jit
def _aswm_dot(g_ptr, f0_ptr, f1_ptr, f2_ptr, s_ptr, C, THW, n_cg, NS: tl.constexpr, CG: tl.constexpr,
              BLOCK: tl.constexpr, ACC: tl.constexpr):
    """s[b, m] += sum_{c in group} dout[b, c] * F_m[b, c]; program = (b * n_cg + group, block of positions)."""
    pid = tl.program_id(0)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = p < THW
    b = pid // n_cg
    cg = pid % n_cg
    s0 = tl.zeros((BLOCK,), dtype=ACC)
    s1 = tl.zeros((BLOCK,), dtype=ACC)
    s2 = tl.zeros((BLOCK,), dtype=ACC)
    for ci in range(CG):
        base = (b * C + cg * CG + ci).to(tl.int64) * THW + p
        g = tl.load(g_ptr + base, mask=m, other=0.0).to(ACC)
        s0 += g * tl.load(f0_ptr + base, mask=m, other=0.0).to(ACC)
        if NS >= 2:
            s1 += g * tl.load(f1_ptr + base, mask=m, other=0.0).to(ACC)
        if NS >= 3:
            s2 += g * tl.load(f2_ptr + base, mask=m, other=0.0).to(ACC)
    sbase = (b * NS).to(tl.int64) * THW + p
    tl.atomic_add(s_ptr + sbase, s0, mask=m)
    if NS >= 2:
        tl.atomic_add(s_ptr + sbase + THW, s1, mask=m)
    if NS >= 3:
        tl.atomic_add(s_ptr + sbase + 2 * THW, s2, mask=m)


@triton.jit
def _aswm_grad(g_ptr, f0_ptr, f1_ptr, f2_ptr, alpha_ptr, gl_ptr, aw_ptr, gf0_ptr, gf1_ptr, gf2_ptr, gaw_ptr,
               C, THW, n_pb, NS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """dF_m[b, c] = alpha_m dout[b, c] + sum_j A[j, m*C + c] dlogit_j, and the 1x1 conv's weight gradient
    sum_pos dlogit_j F_m[c] as partials gaw[b * n_pb + block, j, m*C + c]; program = (b * C + c, block)."""
    pid = tl.program_id(0)
    pb = tl.program_id(1)
    p = pb * BLOCK + tl.arange(0, BLOCK)
    m = p < THW
    b = pid // C
    c = pid % C
    base = pid.to(tl.int64) * THW + p
    abase = (b * NS).to(tl.int64) * THW + p
    g = tl.load(g_ptr + base, mask=m, other=0.0).to(ACC)
    gl0 = tl.load(gl_ptr + abase, mask=m, other=0.0).to(ACC)
    gl1 = gl0
    gl2 = gl0
    if NS >= 2:
        gl1 = tl.load(gl_ptr + abase + THW, mask=m, other=0.0).to(ACC)
    if NS >= 3:
        gl2 = tl.load(gl_ptr + abase + 2 * THW, mask=m, other=0.0).to(ACC)
    gbase = gaw_ptr + (b * n_pb + pb).to(tl.int64) * (NS * NS * C)
    for ms in tl.static_range(NS):
        if ms == 0:
            f_ptr = f0_ptr
            gf_ptr = gf0_ptr
        elif ms == 1:
            f_ptr = f1_ptr
            gf_ptr = gf1_ptr
        else:
            f_ptr = f2_ptr
            gf_ptr = gf2_ptr
        f = tl.load(f_ptr + base, mask=m, other=0.0).to(ACC)
        gf = tl.load(alpha_ptr + abase + ms * THW, mask=m, other=0.0).to(ACC) * g
        gf += tl.load(aw_ptr + ms * C + c).to(ACC) * gl0
        tl.store(gbase + ms * C + c, tl.sum(gl0 * f, axis=0))
        if NS >= 2:
            gf += tl.load(aw_ptr + NS * C + ms * C + c).to(ACC) * gl1
            tl.store(gbase + NS * C + ms * C + c, tl.sum(gl1 * f, axis=0))
        if NS >= 3:
            gf += tl.load(aw_ptr + 2 * NS * C + ms * C + c).to(ACC) * gl2
            tl.store(gbase + 2 * NS * C + ms * C + c, tl.sum(gl2 * f, axis=0))
        tl.store(gf_ptr + base, gf.to(gf_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_scale(h_ptr, g_ptr, pw, rb, rv, wc, t, y, x, xi, xj, ev, own, own_m, T, H, W, gh, K: tl.constexpr,
               PREC: tl.constexpr, ACC: tl.constexpr):
    """One scale's share of the backward for one channel: gh += dF (row-shifted back) @ B^T for every window row,
    and that row's K tap gradients (the diagonals of h_shifted^T @ dF, summed over the tile's rows, i.e. over its
    BB batch elements too) stored to pw. rb [R, 1]: each row's (batch, channel) offset; rv [R]: row's batch < B.
    Runtime loop over the K^2 window rows."""
    R: tl.constexpr = K // 2
    et = xj[None, :] - xi[:, None] + R           # the transposed band: B^T[x, x'] = w[o_t, o_y, x' - x + R]
    em = (et >= 0) & (et < K)
    xm = x < W
    gm = tl.load(g_ptr + own, mask=own_m, other=0.0)
    for d in range(K * K):
        ot = d // K - R
        oy = d % K - R
        tt = t + ot
        yy = y + oy
        m = (rv & (tt >= 0) & (tt < T) & (yy >= 0) & (yy < H))[:, None] & xm[None, :]
        ah = tl.load(h_ptr + rb + (tt * (H * W) + yy * W)[:, None] + x[None, :], mask=m, other=0.0)
        ts = t - ot
        ys = y - oy
        ms = (rv & (ts >= 0) & (ts < T) & (ys >= 0) & (ys < H))[:, None] & xm[None, :]
        ag = tl.load(g_ptr + rb + (ts * (H * W) + ys * W)[:, None] + x[None, :], mask=ms, other=0.0)
        bd = tl.load(wc + d * K + et, mask=em, other=0.0).to(ag.dtype)
        gh += tl.dot(ag, bd, input_precision=PREC, out_dtype=ACC)
        dd = tl.dot(tl.trans(ah), gm, input_precision=PREC, out_dtype=ACC)
        tl.store(pw + d * K + ev, _diag_sums(dd, xi, xj, ev, K), mask=ev < K)
    return gh


@triton.jit
def _bwd(h_ptr, w_ptr, g0_ptr, g1_ptr, g2_ptr, gh_ptr, gw_ptr, B, C, T, H, W, n_tb,
         NS: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
         OFF1: tl.constexpr, OFF2: tl.constexpr, KTOT: tl.constexpr, KM: tl.constexpr, KP: tl.constexpr,
         BB: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, ACC: tl.constexpr,
         PREC: tl.constexpr):
    """dh and partial weight gradients [n_bg * n_tb, C, KTOT] (summed over the tile's BB batch elements and rows);
    program = (batch group * C + c, frame block); the tile's rows are (batch in group, frame, y)."""
    pid = tl.program_id(0)
    tb = tl.program_id(1)
    bg = pid // C
    c = pid % C
    rows = tl.arange(0, BB * BT * BH)
    b = bg * BB + rows // (BT * BH)
    rr = rows % (BT * BH)
    t = tb * BT + rr // BH
    y = rr % BH
    x = tl.arange(0, BW)
    xi = tl.arange(0, BW)
    xj = tl.arange(0, BW)
    ev = tl.arange(0, KP)
    rv = b < B
    rb = ((b * C + c).to(tl.int64) * (T * H * W))[:, None]
    own_m = (rv & (t < T) & (y < H))[:, None] & (x < W)[None, :]
    own = rb + (t * (H * W) + y * W)[:, None] + x[None, :]
    wc = w_ptr + c * KTOT
    pw = gw_ptr + ((bg * n_tb + tb) * C + c).to(tl.int64) * KTOT
    gh = tl.zeros((BB * BT * BH, BW), dtype=ACC)
    gh = _bwd_scale(h_ptr, g0_ptr, pw, rb, rv, wc, t, y, x, xi, xj, ev, own, own_m, T, H, W, gh, K0, PREC, ACC)
    if NS >= 2:
        gh = _bwd_scale(h_ptr, g1_ptr, pw + OFF1, rb, rv, wc + OFF1, t, y, x, xi, xj, ev, own, own_m, T, H, W, gh,
                        K1, PREC, ACC)
    if NS >= 3:
        gh = _bwd_scale(h_ptr, g2_ptr, pw + OFF2, rb, rv, wc + OFF2, t, y, x, xi, xj, ev, own, own_m, T, H, W, gh,
                        K2, PREC, ACC)
    tl.store(gh_ptr + own, gh.to(gh_ptr.dtype.element_ty), mask=own_m)


# ------------------------------------------------------------------------------------------------- launch glue

class _Geom:
    """Tile geometry and constexprs shared by the launches."""

    def __init__(self, h: torch.Tensor, ks: tuple[int, ...]):
        b, c, t, hh, ww = h.shape
        self.B, self.C, self.T, self.H, self.W = b, c, t, hh, ww
        self.ks = ks
        self.NS = len(ks)
        kk = list(ks) + [0] * (MAX_SCALES - len(ks))
        self.K0, self.K1, self.K2 = kk
        offs = [0]
        for k in ks:
            offs.append(offs[-1] + k ** 3)
        self.OFF1 = offs[1] if len(ks) > 1 else 0
        self.OFF2 = offs[2] if len(ks) > 2 else 0
        self.KTOT = offs[len(ks)]
        self.KM = max(ks)
        self.KP = _pow2(self.KM)
        self.BW = max(16, _pow2(ww))
        self.BH = _pow2(hh)
        # frames per program: rows = BT * BH between 16 (tl.dot's minimum) and 128 where the grid allows
        bt = max(1, 128 // self.BH)
        bt = min(bt, _pow2(t))
        while bt * self.BH < 16:
            bt *= 2
        self.BT = bt
        self.n_tb = triton.cdiv(t, bt)
        fbt = CONFIG.get("fwd_frames") or (BATCH1_FORWARD["fwd_frames"] if b == 1 else None)   # the forward's
        # frame block (the backward keeps BT); only ever fewer rows
        self.fwd_BT = max(bt if not fbt else min(_pow2(int(fbt)), bt), triton.cdiv(16, self.BH))
        self.fwd_n_tb = triton.cdiv(t, self.fwd_BT)
        self.THW = t * hh * ww
        if h.dtype == torch.float64:
            self.ACC, self.PREC = tl.float64, "ieee"
        elif h.dtype == torch.float32:
            self.ACC = tl.float32
            self.PREC = "tf32" if tf32_matmul_allowed() else "ieee"
        else:
            self.ACC, self.PREC = tl.float32, "tf32"
        self.acc_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        self.fp32 = h.dtype in (torch.float32, torch.float64)
        # backward tiles hold BB batch elements: the per-row-shift weight-gradient diagonals are taken once per BB
        self.bwd_batch = 2 if self.BT * self.BH <= 128 and b > 1 else 1

    def launch(self, which: str, aswm: bool = False, rows: int = 0, cfg: tuple | None = None) -> dict:
        """(num_warps, num_stages): ``cfg``, else CONFIG's, else 8 warps for tiles over 2048 elements, for fp32 and
        for the ASWM forward (its 3 logit tiles), else 4."""
        tile = (rows or self.BT * self.BH) * self.BW
        default = (8, 3) if tile > 2048 or self.fp32 or (which == "fwd" and aswm) else (4, 3)
        cfg = cfg or CONFIG.get(which) or default
        return {"num_warps": cfg[0], "num_stages": cfg[1]}

    def scale_kw(self):
        return dict(NS=self.NS, K0=self.K0, K1=self.K1, K2=self.K2, OFF1=self.OFF1, OFF2=self.OFF2,
                    KTOT=self.KTOT, KM=self.KM)


def supported(h: torch.Tensor, kernels) -> bool:
    """Shapes the kernels handle: 1..3 windows, an H x W grid up to 128 x 64 (one channel's rows in registers)."""
    return (h.dim() == 5 and 1 <= len(kernels) <= MAX_SCALES and h.shape[3] <= 128 and h.shape[4] <= 64
            and h.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) and h.numel() > 0)


def _three(ts):
    return list(ts) + [ts[0]] * (MAX_SCALES - len(ts))   # absent scales: any valid pointer, never touched


def _channel_group(c: int, b: int) -> int:
    """Channels per ASWM program (the logits' atomics are per group): CONFIG's "aswm_group", else 16 (timed at
    training batches) and 1 at batch 1, where C / 16 programs leave the GPU idle (0.12 vs 0.65 ms at (1, 192, 8,
    14, 14) on the lent H100, docs/BENCHMARKS.md session 12); the largest divisor of C not above it."""
    top = int(CONFIG.get("aswm_group") or (1 if b == 1 else 16))
    return next(g for g in range(min(top, c), 0, -1) if c % g == 0)


def _pos_block(thw: int) -> int:
    return min(1024, _pow2(thw))


# The forward's settings at batch 1 where CONFIG leaves them None (lent H100, bench_fusion_infer.py --points, 3/5/7 +
# ASWM, docs/BENCHMARKS.md). Session 16: partials, shared tiles, one loop stage: 1.23 / 1.67 / 1.60x session 12's
# setting at 192 / 384 / 576 channels. Session 18: the ASWM weights in one launch and 4 warps a program, 1.10 / 1.12 /
# 1.10x on top (msf_mamba_plus tiny 3.44 -> 3.24 ms, base 8.76 -> 8.35 compiled); frame blocks of 4 (two programs a
# channel) 1.05 / 1.03x on top at 192 / 576 (384 not timed); the stacked bands on those 1.03x at 192 channels
# (msf_mamba_plus tiny 3.29 -> 3.09 ms with both) but 0.92x at 576 (and 0.80x at 384 with 8 warps): stacked up to
# STACK_MAX_CHANNELS. All timed in bf16; fp32 / fp64 keep _Geom's warps (the rest is tested there, not timed).
# Session 21 (compiled models, one H100): the padded input and the token-major output, msf_mamba_plus base 7.44 ->
# 6.89 ms, small 3.70 -> 3.47, tiny 2.58 -> 2.56 (token-major output alone; the padded input with a band table 2.59);
# tiny 2.42 with both in a later call on a fresh machine (no same-call baseline).
# Larger batches keep the training settings (not timed with these).
BATCH1_FORWARD = {"logit_partials": True, "fwd_shared": True, "fwd_loop_stages": 1, "fwd_unroll": None,
                  "fwd_stack": None, "alpha_kernel": True, "fwd": (4, 1), "fwd_frames": 4, "fwd_pad_input": True,
                  "out_tokens": True}
STACK_MAX_CHANNELS = 256   # batch 1: the stacked form where C is at most this (faster at 192, slower at 384 and 576)


def _forward_knobs(batch: int, channels: int = 0) -> dict:
    """CONFIG's forward settings, with BATCH1_FORWARD filling the ones CONFIG leaves None at batch 1 (fwd_stack: for
    up to STACK_MAX_CHANNELS channels)."""
    keys = ("logit_partials", "fwd_shared", "fwd_loop_stages", "fwd_unroll", "fwd_stack", "alpha_kernel", "fwd",
            "fwd_pad_input", "out_tokens")
    knobs = {k: CONFIG.get(k) if CONFIG.get(k) is not None or batch != 1 else BATCH1_FORWARD[k] for k in keys}
    if batch == 1 and CONFIG.get("fwd_stack") is None:
        knobs["fwd_stack"] = channels <= STACK_MAX_CHANNELS
    return knobs


def pad_input(h: torch.Tensor, ks) -> torch.Tensor:
    """h [B, C, T, H, W] -> the zero-padded input of the batch-1 forward (CONFIG "fwd_pad_input"): [B, C, n_tb * BT +
    KM - 1, BH + KM - 1, BW], the grid at offset (KM // 2, KM // 2, 0): every row-shifted tile the forward reads is
    inside it, rows start 16-element aligned. One padding op (replacing the forward's own contiguous copy; under
    torch.compile one kernel with the transposition in front of it)."""
    g = _Geom(h, tuple(ks))
    r = g.KM // 2
    # F.pad keeps a channels-last input channels-last: the kernel reads the padded tensor as contiguous
    return F.pad(h, (0, g.BW - g.W, r, g.BH - g.H + r, r, g.fwd_n_tb * g.fwd_BT - g.T + r)).contiguous()


def _launch_forward(h, wpack, aw, ab, ks, out_tokens: bool = False, grid: Optional[list[int]] = None):
    """The forward launches: ([out] with ASWM, else one F per scale), and what the backward needs beyond (h, wpack):
    (awc, alpha, *F) with ASWM, else nothing. ``out_tokens`` (with ASWM): out is [B, T, H, W, C], channels innermost
    (_combine_tokens); the callers permute it to [B, C, T, H, W] indexing. ``grid`` [T, H, W]: h is pad_input's
    padded input of that grid (the stacked and shared forms)."""
    padin = grid is not None
    g = _Geom(h if not padin else h.new_empty((*h.shape[:2], *grid), device="meta"), ks)
    shape = (g.B, g.C, g.T, g.H, g.W)
    fs = [h.new_empty(shape) for _ in ks]
    aswm = aw is not None
    awc = aw.detach().reshape(g.NS, g.NS * g.C).contiguous() if aswm else wpack
    knob = _forward_knobs(g.B, g.C)
    if padin and (not (knob["fwd_stack"] or knob["fwd_shared"]) or not h.is_contiguous() or
                  tuple(h.shape) != (g.B, g.C, g.fwd_n_tb * g.fwd_BT + g.KM - 1, g.BH + g.KM - 1, g.BW)):
        raise ValueError("a padded input feeds the stacked or shared forward only, contiguous, as pad_input pads it "
                         "for this grid")
    if (knob["fwd_shared"] or knob["fwd_stack"]) and knob["fwd_unroll"]:   # the stacked loop: not tried unrolled
        raise ValueError("CONFIG fwd_unroll with fwd_shared or fwd_stack (batch 1's defaults) does not compile in "
                         "Triton 3.6 (PassManager::run failed); set both False to unroll")
    cg = _channel_group(g.C, g.B) if aswm else 1
    n_cg = g.C // cg
    partials = aswm and bool(knob["logit_partials"])
    if partials:   # every element written by exactly one program: no zeroing
        logits = torch.empty((n_cg, g.B, g.NS, g.T, g.H, g.W), device=h.device, dtype=g.acc_dtype)
    else:
        logits = torch.zeros((g.B, g.NS, g.T, g.H, g.W), device=h.device, dtype=g.acc_dtype) if aswm else fs[0]
    f3 = _three(fs)
    _fwd[(g.B * n_cg, g.fwd_n_tb)](h, wpack, *f3, awc, logits, g.C, g.T, g.H, g.W, n_cg, **g.scale_kw(),
                                   CG=cg, BT=g.fwd_BT, BH=g.BH, BW=g.BW, ASWM=aswm,
                                   SHARE=bool(knob["fwd_shared"]), ACC=g.ACC, PREC=g.PREC,
                                   STAGES=knob["fwd_loop_stages"], UNROLL=knob["fwd_unroll"],
                                   PARTIALS=partials, STACK=bool(knob["fwd_stack"]), NSP=_pow2(g.NS), PADIN=padin,
                                   **g.launch("fwd", aswm, rows=g.fwd_BT * g.BH,   # batch 1's warps: timed in bf16
                                              cfg=knob["fwd"] if CONFIG.get("fwd") or not g.fp32 else None))
    if not aswm:
        return fs, ()
    if knob["alpha_kernel"]:   # sum of partials, bias and softmax in one launch
        alpha = torch.empty((g.B, g.NS, g.T, g.H, g.W), device=h.device, dtype=g.acc_dtype)
        parts = logits if partials else logits[None]
        tile_g, tile_p = CONFIG.get("alpha_tile") or (64, 16)
        _alpha[(triton.cdiv(g.THW, tile_p), g.B)](parts, ab.detach() if ab is not None else parts, alpha, g.B,
                                                   g.THW, N_PART=parts.shape[0], NS=g.NS, HAS_BIAS=ab is not None,
                                                   G=tile_g, P=tile_p, ACC=g.ACC, num_warps=4)
    else:
        if partials:
            logits = logits.sum(dim=0)
        if ab is not None:   # an nn.Conv3d(bias=False) passes None
            logits += ab.detach().to(logits.dtype).view(1, -1, 1, 1, 1)
        alpha = torch.softmax(logits, dim=1).contiguous()
    if out_tokens:   # [B, T, H, W, C]: _combine_tokens writes [B, THW, C] memory
        out = h.new_empty((g.B, g.T, g.H, g.W, g.C))
        cb, p = COMBINE_TOKENS_BLOCK
        _combine_tokens[(g.B, triton.cdiv(g.THW, p), triton.cdiv(g.C, cb))](*f3, alpha, out, g.C, g.THW, NS=g.NS,
                                                                             CB=cb, P=p, ACC=g.ACC, num_warps=4)
    else:
        out = h.new_empty(shape)
        blk = _pos_block(g.THW)
        _combine[(g.B * g.C, triton.cdiv(g.THW, blk))](*f3, alpha, out, g.C, g.THW, NS=g.NS, BLOCK=blk, ACC=g.ACC)
    return [out], (awc, alpha, *fs)


@torch.library.custom_op("msf_scale::triton_fusion_forward", mutates_args=())
def _forward_op(h: torch.Tensor, wpack: torch.Tensor, aw: Optional[torch.Tensor], ab: Optional[torch.Tensor],
                ks: list[int], out_tokens: bool = False, grid: Optional[list[int]] = None) -> list[torch.Tensor]:
    """The forward launches as one opaque op, for inference: torch.compile traces a model through it whole (no
    graph break) and Inductor's freezing folds the kernel packing in front of it. No autograd (see _needs_grad).
    The output's layout is an argument, not CONFIG read inside: a compiled graph (and Inductor's on-disk cache of
    it) then holds the layout it was traced with (session 21: a CONFIG-dependent fake reused a cached graph planned
    for the other layout)."""
    return _launch_forward(h, wpack, aw, ab, tuple(ks), out_tokens, grid)[0]


@_forward_op.register_fake
def _(h, wpack, aw, ab, ks, out_tokens=False, grid=None):
    b, c, t, hh, ww = h.shape[:2] + tuple(grid) if grid is not None else h.shape
    if aw is not None:
        return [h.new_empty((b, t, hh, ww, c)) if out_tokens else h.new_empty((b, c, t, hh, ww))]
    return [h.new_empty((b, c, t, hh, ww)) for _ in ks]


def _channels_first(out: torch.Tensor) -> torch.Tensor:
    """[B, T, H, W, C] -> [B, C, T, H, W] indexing (a view: channels_last_3d strides)."""
    return out.permute(0, 4, 1, 2, 3)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


@torch.compiler.disable   # opaque to torch.compile (a graph break), never traced into the launches
def _with_grad(h, wpack, aw, ab, ks):
    return _FusedCFD.apply(h, wpack, aw, ab, ks)


class _FusedCFD(torch.autograd.Function):
    """(h, packed plain depthwise kernels [C, sum k^3], ASWM weight [M, M*C] or None, bias [M] or None)
    -> out (ASWM) or one F per scale."""

    @staticmethod
    def forward(ctx, h, wpack, aw, ab, ks):
        tokens = aw is not None and bool(CONFIG.get("out_tokens"))
        outs, saved = _launch_forward(h, wpack, aw, ab, ks, tokens)
        ctx.ks = ks
        ctx.aswm = aw is not None
        ctx.save_for_backward(h, wpack, *saved)
        if ctx.aswm:
            ctx.aw_meta = (aw.shape, aw.dtype, None if ab is None else ab.dtype)
            return _channels_first(outs[0]) if tokens else outs[0]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        ks = ctx.ks
        h, wpack = ctx.saved_tensors[:2]
        g = _Geom(h, ks)
        gaw = gab = None
        if ctx.aswm:
            awc, alpha, *fs = ctx.saved_tensors[2:]
            gout = grads[0].contiguous().to(h.dtype)
            cg = _channel_group(g.C, g.B)
            n_cg = g.C // cg
            blk = _pos_block(g.THW)
            n_pb = triton.cdiv(g.THW, blk)
            f3 = _three(fs)
            s = torch.zeros_like(alpha)
            _aswm_dot[(g.B * n_cg, n_pb)](gout, *f3, s, g.C, g.THW, n_cg, NS=g.NS, CG=cg, BLOCK=blk, ACC=g.ACC)
            glog = (alpha * (s - (alpha * s).sum(dim=1, keepdim=True))).contiguous()   # softmax backward
            gfs = [torch.empty_like(h) for _ in ks]
            part = torch.empty((g.B * n_pb, g.NS, g.NS * g.C), device=h.device, dtype=g.acc_dtype)
            _aswm_grad[(g.B * g.C, n_pb)](gout, *f3, alpha, glog, awc, *_three(gfs), part, g.C, g.THW, n_pb,
                                          NS=g.NS, BLOCK=blk, ACC=g.ACC)
            shape, aw_dtype, ab_dtype = ctx.aw_meta
            gaw = part.sum(dim=0).reshape(shape).to(aw_dtype)
            gab = None if ab_dtype is None else glog.sum(dim=(0, 2, 3, 4)).to(ab_dtype)
        else:
            gfs = [torch.zeros_like(h) if gr is None else gr.contiguous().to(h.dtype) for gr in grads]
        gh = torch.empty_like(h)
        bb = CONFIG.get("bwd_batch") or g.bwd_batch
        n_bg = triton.cdiv(g.B, bb)
        part = torch.empty((n_bg * g.n_tb, g.C, g.KTOT), device=h.device, dtype=g.acc_dtype)
        _bwd[(n_bg * g.C, g.n_tb)](h, wpack, *_three(gfs), gh, part, g.B, g.C, g.T, g.H, g.W, g.n_tb,
                                   **g.scale_kw(), KP=g.KP, BB=bb, BT=g.BT, BH=g.BH, BW=g.BW, ACC=g.ACC, PREC=g.PREC,
                                   **g.launch("bwd", rows=bb * g.BT * g.BH))
        gw = part.sum(dim=0).to(wpack.dtype)
        return gh, gw, gaw, gab, None


def _packed(h, kernels, theta):   # taps are rounded to h's dtype in-kernel
    return pack_kernels(kernels, theta, h.shape[1], h.dtype)


def _check_device(h):
    import os
    if h.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the triton fusion backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def state_fusion_triton(h: torch.Tensor, kernels, theta) -> list[torch.Tensor]:
    """The ``triton`` backend of state_fusion: every scale in one launch, one fused tensor per kernel. With autograd
    an autograd.Function (a graph break under torch.compile); without, one custom op that torch.compile traces."""
    if not supported(h, kernels):   # more than three windows, or a grid too wide for one tile: the conv path
        return [F.conv3d(h, cfd_kernel(w, theta).to(h.dtype), padding=w.shape[-1] // 2, groups=h.shape[1])
                for w in kernels]
    _check_device(h)
    ks = tuple(int(w.shape[-1]) for w in kernels)
    h = h.contiguous()
    if not _needs_grad(h, *kernels, theta):
        return list(torch.ops.msf_scale.triton_fusion_forward(h, _packed(h, kernels, theta), None, None, list(ks)))
    return list(_with_grad(h, _packed(h, kernels, theta), None, None, ks))


def multiscale_fusion_triton(h: torch.Tensor, kernels, theta, aswm_weight: torch.Tensor,
                             aswm_bias: torch.Tensor | None, packed: torch.Tensor | None = None) -> torch.Tensor:
    """MCFM + ASWM fused: out = sum_m softmax_m(aswm(cat F))_m * F_m, as StateFusion.forward computes it
    (aswm_weight: the nn.Conv3d(M*C, M, 1) weight [M, M*C, 1, 1, 1], aswm_bias [M]). ``packed``: the kernels
    already folded and packed (pack_kernels; StateFusion's inference cache), used only where no gradient is needed."""
    _check_device(h)
    ks = tuple(int(w.shape[-1]) for w in kernels)
    if len(ks) < 2 or not supported(h, kernels):
        raise ValueError(f"the fused ASWM op takes 2..{MAX_SCALES} scales on an H x W grid up to 128 x 64, "
                         f"got scales {ks} on {tuple(h.shape)}")
    if not _needs_grad(h, *kernels, theta, aswm_weight, aswm_bias):
        wpack = packed if packed is not None else _packed(h, kernels, theta)
        knob = _forward_knobs(h.shape[0], h.shape[1])
        tokens = bool(knob["out_tokens"])
        grid = None
        if knob["fwd_pad_input"] and (knob["fwd_stack"] or knob["fwd_shared"]):
            grid, h = list(h.shape[2:]), pad_input(h, ks)   # contiguous: the padding op replaces the copy
        else:
            h = h.contiguous()
        out = torch.ops.msf_scale.triton_fusion_forward(h, wpack, aswm_weight, aswm_bias, list(ks), tokens, grid)[0]
        return _channels_first(out) if tokens else out
    h = h.contiguous()
    return _with_grad(h, _packed(h, kernels, theta), aswm_weight, aswm_bias, ks)


def pack_kernels(kernels, theta, channels: int, dtype: torch.dtype) -> torch.Tensor:
    """The kernels as the launches read them: CFD-folded, [C, sum k^3], fp32 (fp64 for fp64 states)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.cat([cfd_kernel(w, theta).reshape(channels, -1) for w in kernels], dim=1).to(acc).contiguous()
