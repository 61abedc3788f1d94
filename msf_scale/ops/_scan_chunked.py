"""A forward-only selective scan for inference in Triton: chunks of the sequence scanned in parallel, step by step.

Why: at batch 1 (latency) the scan has batch x D x N = 12,288 independent recurrences at tiny's width (both
directions, 768 channels), each 1569 steps long. mamba-ssm gives one thread block per channel and walks the
sequence in block-wide scans, one state index after another; the training-shaped Triton scan (_scan_triton.py)
builds associative-scan tiles. Here a program holds ``BD`` channels x all N states in registers and walks its
chunk step by step: per step and state one exp2 and two FMAs, no shuffles but the sum over N for y; the inputs of
``CONFIG["steps"]`` steps load at once as tiles (a step at a time, each step waited on its loads). Three launches:

    1. ``_chunk_ends``: each chunk from a zero state: its end state and the product of its decays, exp(A sum delta)
    2. ``_chunk_prefix``: an associative scan over the chunks: the state each chunk ends with from the true start
    3. ``_chunk_outputs``: each chunk again from the state the previous one ends with, writing y

so the exps are computed twice (passes 1 and 3); the chunk count is chosen to fill the GPU (CONFIG). With enough
programs without chunking (training-sized batches) passes 1 and 2 are skipped.

Same contract as ops/scan.py's backends: u, delta, z [batch, D, L]; A [D, N]; B, C [batch, N, L] or grouped
[batch, G, N, L]; the last ``reverse_groups`` groups run from t = L - 1 down to 0 (the bidirectional mixer's
backward direction without flipped copies). No autograd: :func:`scan` refuses inputs that need a gradient.
bf16/fp16/fp32 compute in float32, float64 (the interpreter tests) in float64. Runs on CUDA, or on CPU tensors under
``TRITON_INTERPRET=1``. Under torch.compile it is one opaque custom op (``msf_scale::chunked_scan``).
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

# BD channels a program (all N states each), warps a program; chunking: enough chunks that batch x D / BD x chunks
# reaches ``programs`` (none when the batch alone does), each at least ``min_chunk`` steps long. ``steps``: 0, each
# step loads its own inputs (session 14: latency-bound, 0.7-0.9 us a step); a power of two, blocks of that many steps
# load theirs at once and pick a step's column out of the tiles (8: 1.28 / 1.58 / 1.72x mamba-ssm's kernel at tiny /
# small / base's batch-1 widths, against 0.79 / 0.87 / 0.87x per step; 4: the same; 16: slower; issuing the next
# block's loads before this block's steps: slower, 1.18 / 1.46 / 1.60x; H100, session 15, docs/BENCHMARKS.md). Session
# 17, one call: 4 is 1.30 / 1.62 / 1.54x against 8's 1.28 / 1.58 / 1.47x (base width 1152), 2 no better: 4 is the
# default (videomamba / msf_mamba base batch-1 compiled 1.4-1.5% faster).
# Pass 1 on per-step vectors (no barriers or shuffles when compiled) was timed in session 17: slower than the tiles
# (0.98-1.18x mamba-ssm against the tiles' 1.28-1.65x), removed.
# ``steps_tokens``: the same for token-major inputs (u and delta with the channels at unit stride: the grouped mixer's
# batch-1 path since session 20), where the tiles' step axis no longer lies in one thread: 2 (session 20, H100,
# bench_scan_infer --layouts: 1.41 / 1.64x mamba-ssm at tiny / base width against 4's 1.26 / 1.39x and 8's 0.75 /
# 0.77x; channel-major inputs with 4: 1.30 / 1.55x).
CONFIG = {"BD": 16, "warps": 1, "programs": 2048, "min_chunk": 16, "steps": 4, "steps_tokens": 2}
PREFIX_ELEMENTS = 4096   # elements of a chunk-prefix program's [channels, chunks, N] tile (4 warps: no spills on sm_90)


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))


@triton.jit
def _setup(A, DPG, REV_FROM, DIM, N: tl.constexpr, BD: tl.constexpr, CDT: tl.constexpr):
    """This program's batch row b, chunk c, channels d [BD], group g, whether g runs backwards, n, A * log2(e)."""
    nb = DIM // BD
    b = tl.program_id(0) // nb
    d0 = (tl.program_id(0) % nb) * BD
    d = d0 + tl.arange(0, BD)
    g = d0 // DPG
    n = tl.arange(0, N)
    A2 = tl.load(A + d[:, None] * N + n[None, :]).to(CDT) * 1.4426950408889634
    return b, tl.program_id(1), d, g, g >= REV_FROM, n, A2


@triton.jit
def _step(U, DT, BIAS, Bm, b, g, d, n, j, L, rev, su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_g, sB_n, sB_l,
          HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CDT: tl.constexpr):
    """Scan position j's inputs: time t (j, or L - 1 - j reversed), u [BD], delta [BD] (0 past L: an identity step),
    B_t [N]."""
    valid = j < L
    t = tl.where(rev, L - 1 - j, j)
    u = tl.load(U + b * su_b + d * su_d + t * su_l, mask=valid, other=0.0).to(CDT)
    raw = tl.load(DT + b * sdt_b + d * sdt_d + t * sdt_l, mask=valid, other=0.0).to(CDT)
    if HAS_BIAS:
        raw += tl.load(BIAS + d).to(CDT)
    delta = _softplus(raw) if SOFTPLUS else raw
    delta = tl.where(valid, delta, 0.0)
    Bt = tl.load(Bm + b * sB_b + g * sB_g + n * sB_n + t * sB_l, mask=valid, other=0.0).to(CDT)
    return t, valid, u, delta, Bt


@triton.jit
def _tile(U, DT, BIAS, Bm, b, g, d, n, c, blk, L, rev, su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_g, sB_n, sB_l,
          LC: tl.constexpr, TS: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CDT: tl.constexpr):
    """Block ``blk`` of TS steps of chunk c, every load issued at once: times tt [TS], valid [TS] (inside the chunk
    and the sequence), u and delta [BD, TS] (delta 0 where not valid: identity steps), B [N, TS]."""
    s = tl.arange(0, TS)
    jj = c * LC + blk * TS + s
    valid = (jj < L) & (blk * TS + s < LC)
    tt = tl.where(rev, L - 1 - jj, jj)
    u = tl.load(U + b * su_b + d[:, None] * su_d + tt[None, :] * su_l, mask=valid[None, :], other=0.0).to(CDT)
    raw = tl.load(DT + b * sdt_b + d[:, None] * sdt_d + tt[None, :] * sdt_l, mask=valid[None, :],
                  other=0.0).to(CDT)
    if HAS_BIAS:
        raw += tl.load(BIAS + d).to(CDT)[:, None]
    delta = _softplus(raw) if SOFTPLUS else raw
    delta = tl.where(valid[None, :], delta, 0.0)
    Bt = tl.load(Bm + b * sB_b + g * sB_g + n[:, None] * sB_n + tt[None, :] * sB_l, mask=valid[None, :],
                 other=0.0).to(CDT)
    return s, tt, valid, u, delta, Bt


@triton.jit
def _column(tile, s, i):
    """Column i of a [rows, TS] tile, as [rows]."""
    return tl.sum(tl.where(s[None, :] == i, tile, 0.0), axis=1)


@triton.jit
def _ends_block(h, total, s, delta, u, Bt, A2, TS: tl.constexpr):
    """Pass 1's TS steps of one loaded block: the state and the sum of delta carried on."""
    du = delta * u
    for i in tl.static_range(TS):
        di = _column(delta, s, i)
        h = tl.exp2(di[:, None] * A2) * h + _column(du, s, i)[:, None] * _column(Bt, s, i)[None, :]
    return h, total + tl.sum(delta, axis=1)


@triton.jit
def _outputs_block(h, s, delta, u, Bt, Ct, A2, BD: tl.constexpr, TS: tl.constexpr, CDT: tl.constexpr):
    """Pass 3's TS steps of one loaded block: the state carried on, <C_t, h_t> gathered into a [BD, TS] tile."""
    du = delta * u
    y = tl.zeros([BD, TS], dtype=CDT)
    for i in tl.static_range(TS):
        di = _column(delta, s, i)
        h = tl.exp2(di[:, None] * A2) * h + _column(du, s, i)[:, None] * _column(Bt, s, i)[None, :]
        yi = tl.sum(h * _column(Ct, s, i)[None, :], axis=1)
        y = tl.where(s[None, :] == i, yi[:, None], y)
    return h, y


@triton.jit
def _chunk_ends(U, DT, A, Bm, BIAS, HEND, PROD,
                su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_g, sB_n, sB_l, L, DIM, DPG, REV_FROM,
                NC: tl.constexpr, LC: tl.constexpr, N: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr, CDT: tl.constexpr, TS: tl.constexpr):
    """Pass 1: chunk c from a zero state: its end state (HEND) and decay product (PROD), [batch, D, NC, N]. TS = 0:
    each step loads its own inputs; TS > 0: blocks of TS steps load theirs at once (then a step's column is picked
    out of the tiles)."""
    b, c, d, g, rev, n, A2 = _setup(A, DPG, REV_FROM, DIM, N, BD, CDT)
    h = tl.zeros([BD, N], dtype=CDT)
    total = tl.zeros([BD], dtype=CDT)
    if TS == 0:
        for i in range(LC):
            t, valid, u, delta, Bt = _step(U, DT, BIAS, Bm, b, g, d, n, c * LC + i, L, rev, su_b, su_d, su_l,
                                           sdt_b, sdt_d, sdt_l, sB_b, sB_g, sB_n, sB_l, HAS_BIAS, SOFTPLUS, CDT)
            h = tl.exp2(delta[:, None] * A2) * h + (delta * u)[:, None] * Bt[None, :]
            total += delta
    else:
        for blk in range((LC + TS - 1) // TS):
            s, tt, valid, u, delta, Bt = _tile(U, DT, BIAS, Bm, b, g, d, n, c, blk, L, rev, su_b, su_d, su_l,
                                               sdt_b, sdt_d, sdt_l, sB_b, sB_g, sB_n, sB_l, LC, TS, HAS_BIAS,
                                               SOFTPLUS, CDT)
            h, total = _ends_block(h, total, s, delta, u, Bt, A2, TS)
    off = ((b * DIM + d[:, None]) * NC + c) * N + n[None, :]
    tl.store(HEND + off, h)
    tl.store(PROD + off, tl.exp2(total[:, None] * A2))


@triton.jit
def _combine(a1, b1, a2, b2):
    """(a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _chunk_prefix(HEND, PROD, DIM, NC: tl.constexpr, NCP: tl.constexpr, N: tl.constexpr, BD: tl.constexpr):
    """Pass 2: HEND[.., c, :] becomes the state after chunk c from the sequence's (zero) start: an associative scan
    over the chunks of (decay product, end state)."""
    nb = DIM // BD
    b = tl.program_id(0) // nb
    d = (tl.program_id(0) % nb) * BD + tl.arange(0, BD)
    c = tl.arange(0, NCP)
    n = tl.arange(0, N)
    off = ((b * DIM + d[:, None, None]) * NC + c[None, :, None]) * N + n[None, None, :]
    ok = (c < NC)[None, :, None]
    p = tl.load(PROD + off, mask=ok, other=1.0)
    h = tl.load(HEND + off, mask=ok, other=0.0)
    _, h = tl.associative_scan((p, h), 1, _combine)
    tl.store(HEND + off, h, mask=ok)


@triton.jit
def _store_block(Y, Z, y, Dd, u, b, d, tt, valid, sz_b, sz_d, sz_l, sy_b, sy_d, sy_l, HAS_Z: tl.constexpr,
                 CDT: tl.constexpr):
    """A block's y [BD, TS]: + D u, times silu(z) with z, stored at once."""
    y += Dd[:, None] * u
    if HAS_Z:
        z = tl.load(Z + b * sz_b + d[:, None] * sz_d + tt[None, :] * sz_l, mask=valid[None, :], other=0.0).to(CDT)
        y = y * z / (1.0 + tl.exp(-z))
    tl.store(Y + b * sy_b + d[:, None] * sy_d + tt[None, :] * sy_l, y.to(Y.dtype.element_ty), mask=valid[None, :])


@triton.jit
def _chunk_outputs(U, DT, Z, A, Bm, Cm, Dv, BIAS, HEND, Y,
                   su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l, sB_b, sB_g, sB_n, sB_l,
                   sC_b, sC_g, sC_n, sC_l, sy_b, sy_d, sy_l, L, DIM, DPG, REV_FROM,
                   NC: tl.constexpr, LC: tl.constexpr, N: tl.constexpr, BD: tl.constexpr, HAS_D: tl.constexpr,
                   HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CDT: tl.constexpr,
                   TS: tl.constexpr):
    """Pass 3: chunk c from the state chunk c - 1 ends with (pass 2; zero for c = 0): y_t = <C_t, h_t> + D u_t,
    times silu(z_t) with z. With NC = 1 the whole sequence, and the last state goes to HEND. TS as in pass 1 (with
    TS > 0 a block's y is gathered into a [BD, TS] tile and stored at once)."""
    b, c, d, g, rev, n, A2 = _setup(A, DPG, REV_FROM, DIM, N, BD, CDT)
    off = ((b * DIM + d[:, None]) * NC + c - 1) * N + n[None, :]
    h = tl.load(HEND + off, mask=(c > 0) & (n[None, :] < N), other=0.0).to(CDT)
    Dd = tl.load(Dv + d).to(CDT) if HAS_D else tl.zeros([BD], dtype=CDT)
    if TS == 0:
        for i in range(LC):
            t, valid, u, delta, Bt = _step(U, DT, BIAS, Bm, b, g, d, n, c * LC + i, L, rev, su_b, su_d, su_l,
                                           sdt_b, sdt_d, sdt_l, sB_b, sB_g, sB_n, sB_l, HAS_BIAS, SOFTPLUS, CDT)
            Ct = tl.load(Cm + b * sC_b + g * sC_g + n * sC_n + t * sC_l, mask=valid, other=0.0).to(CDT)
            h = tl.exp2(delta[:, None] * A2) * h + (delta * u)[:, None] * Bt[None, :]
            y = tl.sum(h * Ct[None, :], axis=1) + Dd * u
            if HAS_Z:
                z = tl.load(Z + b * sz_b + d * sz_d + t * sz_l, mask=valid, other=0.0).to(CDT)
                y = y * z / (1.0 + tl.exp(-z))
            tl.store(Y + b * sy_b + d * sy_d + t * sy_l, y.to(Y.dtype.element_ty), mask=valid)
    else:
        for blk in range((LC + TS - 1) // TS):
            s, tt, valid, u, delta, Bt = _tile(U, DT, BIAS, Bm, b, g, d, n, c, blk, L, rev, su_b, su_d, su_l,
                                               sdt_b, sdt_d, sdt_l, sB_b, sB_g, sB_n, sB_l, LC, TS, HAS_BIAS,
                                               SOFTPLUS, CDT)
            Ct = tl.load(Cm + b * sC_b + g * sC_g + n[:, None] * sC_n + tt[None, :] * sC_l, mask=valid[None, :],
                         other=0.0).to(CDT)
            h, y = _outputs_block(h, s, delta, u, Bt, Ct, A2, BD, TS, CDT)
            _store_block(Y, Z, y, Dd, u, b, d, tt, valid, sz_b, sz_d, sz_l, sy_b, sy_d, sy_l, HAS_Z, CDT)
    if NC == 1:
        tl.store(HEND + (b * DIM + d[:, None]) * N + n[None, :], h)


def check_device(device: torch.device) -> None:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the chunked scan backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def chunking(batch: int, dim: int, length: int, bd: int) -> tuple[int, int]:
    """(chunks, steps a chunk): enough chunks that batch x D / BD x chunks reaches CONFIG["programs"], none shorter
    than min_chunk steps; one when the batch fills the GPU by itself. The last chunk may end past the sequence."""
    rows = batch * (dim // bd)
    want = max(1, min(-(-CONFIG["programs"] // rows), length // CONFIG["min_chunk"]))
    steps = -(-length // want)
    return -(-length // steps), steps


def steps_per_block(u: torch.Tensor) -> int:
    """CONFIG's steps a loaded block for u's layout: ``steps_tokens`` where the channels are at unit stride (and the
    sequence is not), ``steps`` otherwise."""
    token_major = u.stride(1) == 1 and u.shape[2] > 1 and u.stride(2) != 1
    return int(CONFIG["steps_tokens"] if token_major else CONFIG["steps"])


def _block(dim: int, per_group: int) -> int:
    """Channels per program: CONFIG's BD or the largest power of two dividing both D and a group's channels."""
    bd = CONFIG["BD"]
    while bd > 1 and (dim % bd or per_group % bd):
        bd //= 2
    return bd


def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse_groups=0):
    """(y [batch, D, L] in u's dtype and layout (torch.empty_like: a [batch, L, D] tensor's transposed view gives a
    transposed view back), last state [batch, D, N] float32 (float64 inputs: float64)), forward only."""
    check_device(u.device)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (u, delta, A, B, C, D, z, delta_bias)):
        raise RuntimeError("the chunked scan is forward-only (inference); use backend 'cuda' or 'triton' to train")
    return torch.ops.msf_scale.chunked_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse_groups)


# Inductor must hand the op the strides it was traced with (y follows u's layout): recent torch's default constraint,
# asked for explicitly where the tag exists
EXACT_STRIDES = tuple(t for t in (getattr(torch.Tag, "needs_exact_strides", None),) if t is not None)


@torch.library.custom_op("msf_scale::chunked_scan", mutates_args=(), tags=EXACT_STRIDES)
def _chunked_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
                  delta_softplus: bool, reverse_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The three launches as one op: torch.compile traces a model through it without a graph break."""
    with torch.cuda.device(u.device) if u.device.type == "cuda" else nullcontext():   # Triton launches on the
        return _launch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse_groups)  # current device


def _fits_int32(nc: int, n: int, u, *tensors) -> bool:
    """Whether every element offset the kernels form (int32 arithmetic: program ids times strides) stays below 2^31:
    each input's furthest element by its strides, y (dense, u's shape) and the chunk states [batch, D, NC, N]."""
    batch, dim, length = u.shape
    furthest = [sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
                for t in (u, *tensors) if t is not None]
    return max(furthest + [batch * dim * length, batch * dim * nc * n]) < 2 ** 31


def _launch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse_groups):
    batch, dim, length = u.shape
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    groups, n = B.shape[1], A.shape[1]
    if n & (n - 1):
        raise ValueError(f"the chunked scan needs a power-of-two d_state, got N={n}")
    if not 0 <= reverse_groups <= groups:
        raise ValueError(f"reverse_groups={reverse_groups} must be within 0..G={groups}")
    state = torch.float64 if u.dtype == torch.float64 else torch.float32
    if length == 0:   # nothing to scan: an empty y, the zero start state
        return torch.empty_like(u), u.new_zeros(batch, dim, n, dtype=state)
    dpg = dim // groups
    bd = _block(dim, dpg)
    nc, lc = chunking(batch, dim, length, bd)
    if not _fits_int32(nc, n, u, delta, B, C, z):
        raise ValueError(f"the chunked scan indexes with int32: u {tuple(u.shape)} with d_state {n} is too large "
                         f"(split the batch, or use backend 'cuda')")
    cdt = tl.float64 if u.dtype == torch.float64 else tl.float32
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    bias = delta_bias.contiguous() if delta_bias is not None else A
    hend = torch.empty((batch, dim, nc, n), device=u.device, dtype=state)
    y = torch.empty_like(u)
    common = dict(N=n, BD=bd, CDT=cdt, TS=steps_per_block(u), num_warps=CONFIG["warps"])
    strides = (*u.stride(), *delta.stride())
    bstride = B.stride()
    grid = (batch * (dim // bd), nc)
    rev_from = groups - reverse_groups
    if nc > 1:
        prod = torch.empty_like(hend)
        _chunk_ends[grid](u, delta, A, B, bias, hend, prod, *strides, *bstride, length, dim, dpg, rev_from,
                          NC=nc, LC=lc, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, **common)
        ncp = triton.next_power_of_2(nc)
        bdp = min(bd, max(1, PREFIX_ELEMENTS // (ncp * n)))   # a power of two dividing BD, so D
        _chunk_prefix[(batch * (dim // bdp),)](hend, prod, dim, NC=nc, NCP=ncp, N=n, BD=bdp, num_warps=4)
    zz = z if z is not None else u
    _chunk_outputs[grid](u, delta, zz, A, B, C, D if D is not None else A, bias, hend, y, *strides, *zz.stride(),
                         *bstride, *C.stride(), *y.stride(), length, dim, dpg, rev_from,
                         NC=nc, LC=lc, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                         SOFTPLUS=delta_softplus, **common)
    return y, hend[:, :, -1].clone()


@_chunked_scan.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse_groups):
    state = torch.float64 if u.dtype == torch.float64 else torch.float32
    return (torch.empty_like(u),
            u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=state))
