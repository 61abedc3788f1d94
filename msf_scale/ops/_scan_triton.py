"""The selective scan in Triton: both directions of the bidirectional mixer in one launch, no flipped copies.

Same recurrence and signature as the other backends (ops/scan.py), plus ``reverse_groups``: with grouped B/C
([batch, G, N, L]) the last ``reverse_groups`` groups are scanned from t = L - 1 down to t = 0, reading and
writing every tensor in its own time order. The bidirectional mixer's backward direction is then one more group
of the same call instead of a flipped copy in, a flipped copy out and a second launch (issue 19 item 2).

One program holds ``BD`` channels of one batch row and walks the sequence (or, with few programs, one chunk of it:
``chunking``, CONFIG["chunk_programs"]) in tiles of ``BT`` steps: a tile's
states h [BD, N, BT] come from ``tl.associative_scan`` over (a_t, b_t) = (exp(delta_t A), delta_t u_t B_t) plus the
carried entry state times the running decay product; y_t = <C_t, h_t> + D u_t, gated by silu(z_t). The forward
saves each tile's entry state (float32 [batch, D, tiles, N]: N / BT floats per step and channel, 1 at BT = N = 16,
twice a bf16 u) so the backward redoes one tile at a time, newest first, with no [.., N, L] buffer: the adjoint
G_t = C_t g_t + a_{t+1} G_{t+1} is a reverse associative scan over the tile (a_{t+1} from a shifted load of
delta), carried across tiles, and a_t h_{t-1} = h_t - b_t gives the decay's gradients without a
shifted state. dB and dC (shared by a group's channels) are reduced per program and, by default
(``CONFIG["partials"]``), stored per program and summed by torch: float32 [batch, D / bwd_BD, N, L] each, transient
(2 x 1.2 GB at small's shape, batch 32): on the H100 the backward took 17.5 ms so, 31.3 ms with atomic adds into
[batch, G, N, L]. dA, dD and d(delta_bias) are written per batch row and summed by torch. As mamba-ssm: the last
state gets no gradient; bf16/fp16/fp32 inputs compute in float32, float64 inputs (the interpreter tests) in float64.

Measured (H100, bf16, (32, 2 x 768, 1569, 16), benchmarks/bench_biscan.py, docs/BENCHMARKS.md "Speed, session
10"): forward 3.6 ms, forward + backward 21.1 ms, against mamba-ssm's grouped kernel at 2.9 / 14.6 ms: 0.69x. So
``auto`` never picks it; the mixer uses it only when asked (``scan_backend="triton"`` with ``grouped_scan``).

Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (how the CPU tests run it). Eager only: under
torch.compile the scan's custom ops run the torch scan for this backend name. The tile count is a compile-time
constant (Triton's interpreter cannot loop to a runtime bound), so each new sequence length (and, below
chunk_programs, each new chunk count: batch x channels) compiles the kernels once; offsets are int32 (``scan``
refuses calls whose tensors or buffers reach 2^31 elements).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

# BT steps per tile (pow2; the backward redoes the forward's tiles, so one BT for both); channels per program and
# warps of the forward (BD, warps) and of the backward (bwd_BD, bwd_warps); ``partials``: the backward writes dB, dC
# per program ([batch, D / bwd_BD, N, L] float32, summed by torch) instead of adding them atomically in place.
# Tile elements BD x N x BT set the register use (benchmarks/kernel_resources.py --scan-tiles).
# ``chunk_programs``: below this many forward programs (batch x D / BD: batch-1 inference) the forward also splits the
# sequence into chunks run by programs of their own (a first pass finds each chunk's end state from zero and its
# decay product; each chunk's program then starts from the chunks before it): more parallel work, ~2x the arithmetic.
# Timed at batch 1, tiny's width (H100, bench_biscan --forward-only): 0.36 ms unchunked, 0.26 at 1024 (best of
# 1024-8192), mamba-ssm 0.10.
CONFIG = {"BT": 16, "BD": 4, "warps": 1, "bwd_BD": 4, "bwd_warps": 2, "partials": True, "chunk_programs": 1024}


@triton.jit
def _combine(a1, b1, a2, b2):
    """(a1, b1) then (a2, b2): h -> a2 (a1 h + b1) + b2."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))


@triton.jit
def _program(A, Dv, DPG, REV_FROM, N: tl.constexpr, BD: tl.constexpr, HAS_D: tl.constexpr, CDT: tl.constexpr):
    """This program's batch row b, channels d [BD], group g, whether g runs backwards, the state index n, A [BD, N,
    1] and D [BD] (zeros without D)."""
    b = tl.program_id(0)
    d0 = tl.program_id(1) * BD
    d = d0 + tl.arange(0, BD)
    g = d0 // DPG
    n = tl.arange(0, N)
    A3 = tl.load(A + d[:, None] * N + n[None, :]).to(CDT)[:, :, None]
    Dd = tl.load(Dv + d).to(CDT) if HAS_D else tl.zeros([BD], dtype=CDT)
    return b, d, g, g >= REV_FROM, n, A3, Dd


@triton.jit
def _tile_inputs(U, DT, BIAS, Bm, Cm, b, g, d, j, L, rev, A3,
                 su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
                 N: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CDT: tl.constexpr):
    """One tile's inputs at scan positions j [BT] (time t = j, or L - 1 - j when reversed), masked past L:
    u, delta, B, C, the time indices, and a, b of the recurrence (identity where masked)."""
    valid = j < L
    t = tl.where(rev, L - 1 - j, j)
    n = tl.arange(0, N)
    u = tl.load(U + b * su_b + d[:, None] * su_d + t[None, :] * su_l, mask=valid[None, :], other=0.0).to(CDT)
    raw = tl.load(DT + b * sdt_b + d[:, None] * sdt_d + t[None, :] * sdt_l, mask=valid[None, :],
                  other=0.0).to(CDT)
    if HAS_BIAS:
        raw += tl.load(BIAS + d).to(CDT)[:, None]
    delta = _softplus(raw) if SOFTPLUS else raw
    delta = tl.where(valid[None, :], delta, 0.0)
    Bt = tl.load(Bm + b * sB_b + g * sB_g + n[:, None] * sB_n + t[None, :] * sB_l, mask=valid[None, :],
                 other=0.0).to(CDT)
    Ct = tl.load(Cm + b * sC_b + g * sC_g + n[:, None] * sC_n + t[None, :] * sC_l, mask=valid[None, :],
                 other=0.0).to(CDT)
    a = tl.exp2(delta[:, None, :] * (A3 * 1.4426950408889634))             # [BD, N, BT]; exp2: one SFU op
    bb = (delta * u)[:, None, :] * Bt[None, :, :]
    return u, raw, delta, Bt, Ct, t, valid, a, bb


@triton.jit
def _chunk_ends(U, DT, A, Bm, Cm, Dv, BIAS, HEND, PROD,
                su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
                L, DIM, DPG, REV_FROM,
                NC: tl.constexpr, TPC: tl.constexpr, N: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
                HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CDT: tl.constexpr):
    """The chunked forward's first pass: chunk c's state at its end from a zero start (HEND) and the product of its
    decays (PROD), float32 [batch, D, NC, N]; masked steps past L are the identity."""
    b, d, g, rev, n, A3, Dd = _program(A, Dv, DPG, REV_FROM, N, BD, HAS_D, CDT)
    c = tl.program_id(2)
    k = tl.arange(0, BT)
    h = tl.zeros([BD, N], dtype=CDT)
    p = tl.full([BD, N], 1.0, dtype=CDT)
    for i in range(TPC):
        j = (c * TPC + i) * BT + k
        u, raw, delta, Bt, Ct, t, valid, a, bb = _tile_inputs(
            U, DT, BIAS, Bm, Cm, b, g, d, j, L, rev, A3, su_b, su_d, su_l, sdt_b, sdt_d, sdt_l,
            sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l, N, HAS_BIAS, SOFTPLUS, CDT)
        decay, hs = tl.associative_scan((a, bb), 2, _combine)
        last = k[None, None, :] == BT - 1
        dl = tl.sum(tl.where(last, decay, 0.0), axis=2)
        h = dl * h + tl.sum(tl.where(last, hs, 0.0), axis=2)
        p *= dl
    off = ((b * DIM + d[:, None]) * NC + c) * N + n[None, :]
    tl.store(HEND + off, h)
    tl.store(PROD + off, p)


@triton.jit
def _scan_fwd(U, DT, Z, A, Bm, Cm, Dv, BIAS, Y, LAST, STATES, HEND, PROD,
              su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l,
              sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l, sy_b, sy_d, sy_l,
              L, DIM, DPG, REV_FROM,
              NT: tl.constexpr, NC: tl.constexpr, TPC: tl.constexpr, N: tl.constexpr, BD: tl.constexpr,
              BT: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
              SOFTPLUS: tl.constexpr, SAVE: tl.constexpr, CDT: tl.constexpr):
    """Program (b, channel block, chunk c): the tiles c * TPC .. of the sequence (NC = 1: all NT of them), starting
    from the state the chunks before c leave (_chunk_ends' HEND, PROD)."""
    b, d, g, rev, n, A3, Dd = _program(A, Dv, DPG, REV_FROM, N, BD, HAS_D, CDT)
    c = tl.program_id(2)
    k = tl.arange(0, BT)
    h = tl.zeros([BD, N], dtype=CDT)
    if NC > 1:
        for cc in range(NC - 1):
            off = ((b * DIM + d[:, None]) * NC + cc) * N + n[None, :]
            h = tl.where(cc < c, tl.load(PROD + off) * h + tl.load(HEND + off), h)
    for i in range(TPC):
        it = c * TPC + i
        if SAVE:
            tl.store(STATES + ((b * DIM + d[:, None]) * NT + it) * N + n[None, :], h, mask=it < NT)
        j = it * BT + k
        u, raw, delta, Bt, Ct, t, valid, a, bb = _tile_inputs(
            U, DT, BIAS, Bm, Cm, b, g, d, j, L, rev, A3, su_b, su_d, su_l, sdt_b, sdt_d, sdt_l,
            sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l, N, HAS_BIAS, SOFTPLUS, CDT)
        decay, hs = tl.associative_scan((a, bb), 2, _combine)
        hs += decay * h[:, :, None]
        y = tl.sum(hs * Ct[None, :, :], axis=1)                             # [BD, BT]
        if HAS_D:
            y += Dd[:, None] * u
        if HAS_Z:
            zz = tl.load(Z + b * sz_b + d[:, None] * sz_d + t[None, :] * sz_l, mask=valid[None, :],
                         other=0.0).to(CDT)
            y *= zz / (1.0 + tl.exp(-zz))
        tl.store(Y + b * sy_b + d[:, None] * sy_d + t[None, :] * sy_l, y, mask=valid[None, :])
        h = tl.sum(tl.where(k[None, None, :] == BT - 1, hs, 0.0), axis=2)   # masked steps keep the state
    tl.store(LAST + (b * DIM + d[:, None]) * N + n[None, :], h, mask=c == NC - 1)


@triton.jit
def _reduce_into(OUT, part, b, g, G, n, t, L, valid, DIM, BD: tl.constexpr, N: tl.constexpr, PARTIAL: tl.constexpr):
    """A program's [N, BT] share of dB or dC (summed over its channels): added atomically into the group's
    [batch, G, N, L] slice, or (PARTIAL) stored in its own slice of [batch, D / BD, N, L]."""
    if PARTIAL:
        slot = b * (DIM // BD) + tl.program_id(1)
        tl.store(OUT + (slot * N + n[:, None]) * L + t[None, :], part.to(OUT.dtype.element_ty), mask=valid[None, :])
    else:
        tl.atomic_add(OUT + ((b * G + g) * N + n[:, None]) * L + t[None, :], part.to(OUT.dtype.element_ty),
                      mask=valid[None, :])


@triton.jit
def _scan_bwd(U, DT, Z, A, Bm, Cm, Dv, BIAS, STATES, DOUT,
              DU, DDT, DZ, DA, DB, DC, DD, DBIAS,
              su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l,
              sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l, so_b, so_d, so_l,
              L, DIM, G, DPG, REV_FROM,
              NT: tl.constexpr, N: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, HAS_D: tl.constexpr,
              HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CDT: tl.constexpr,
              PARTIAL: tl.constexpr):
    """Gradient outputs: DU, DDT, DZ in the layout [batch, D, L] (contiguous); DA [batch, D, N], DD and DBIAS
    [batch, D] per batch row; DB, DC [batch, G, N, L] float32, zeroed, added into (PARTIAL: [batch, D / BD, N, L],
    one slice per program, stored)."""
    b, d, g, rev, n, A3, Dd = _program(A, Dv, DPG, REV_FROM, N, BD, HAS_D, CDT)
    k = tl.arange(0, BT)
    adj = tl.zeros([BD, N], dtype=CDT)          # G at the first position of the tile after this one
    dA = tl.zeros([BD, N], dtype=CDT)
    dD = tl.zeros([BD], dtype=CDT)
    dbias = tl.zeros([BD], dtype=CDT)
    for back in range(NT):
        it = NT - 1 - back
        j = it * BT + k
        u, raw, delta, Bt, Ct, t, valid, a, bb = _tile_inputs(
            U, DT, BIAS, Bm, Cm, b, g, d, j, L, rev, A3, su_b, su_d, su_l, sdt_b, sdt_d, sdt_l,
            sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l, N, HAS_BIAS, SOFTPLUS, CDT)
        h0 = tl.load(STATES + ((b * DIM + d[:, None]) * NT + it) * N + n[None, :])
        decay, h = tl.associative_scan((a, bb), 2, _combine)
        h += decay * h0[:, :, None]                                          # states h_t of the tile
        gy = tl.load(DOUT + b * so_b + d[:, None] * so_d + t[None, :] * so_l, mask=valid[None, :],
                     other=0.0).to(CDT)
        if HAS_Z:
            off = (b * DIM + d[:, None]) * L + t[None, :]
            zz = tl.load(Z + b * sz_b + d[:, None] * sz_d + t[None, :] * sz_l, mask=valid[None, :],
                         other=0.0).to(CDT)
            sig = 1.0 / (1.0 + tl.exp(-zz))
            y = tl.sum(h * Ct[None, :, :], axis=1)
            if HAS_D:
                y += Dd[:, None] * u
            tl.store(DZ + off, gy * y * sig * (1.0 + zz * (1.0 - sig)), mask=valid[None, :])
            gy = gy * zz * sig                                               # gradient of y before the gate
        if HAS_D:
            dD += tl.sum(gy * u, axis=1)
        _reduce_into(DC, tl.sum(gy[:, None, :] * h, axis=0), b, g, G, n, t, L, valid, DIM, BD, N, PARTIAL)
        decayed = h - bb                          # a_t h_{t-1}: all the rest needs of h and b (fewer live tiles)
        # the adjoint: G_t = C_t gy_t + a_{t+1} G_{t+1}, a_{t+1} from the next scan position's delta
        jn = j + 1
        tn = tl.where(rev, L - 1 - jn, jn)
        nxt = jn < L
        raw_n = tl.load(DT + b * sdt_b + d[:, None] * sdt_d + tn[None, :] * sdt_l, mask=nxt[None, :],
                        other=0.0).to(CDT)
        if HAS_BIAS:
            raw_n += tl.load(BIAS + d).to(CDT)[:, None]
        delta_n = _softplus(raw_n) if SOFTPLUS else raw_n
        a_next = tl.where(nxt[None, None, :], tl.exp2(delta_n[:, None, :] * (A3 * 1.4426950408889634)), 0.0)
        carry, adj_t = tl.associative_scan((a_next, Ct[None, :, :] * gy[:, None, :]), 2, _combine, reverse=True)
        adj_t += carry * adj[:, :, None]                                     # G_t [BD, N, BT]
        adj = tl.sum(tl.where(k[None, None, :] == 0, adj_t, 0.0), axis=2)
        gB = tl.sum(adj_t * Bt[None, :, :], axis=1)                          # [BD, BT]
        du = gB * delta
        if HAS_D:
            du += Dd[:, None] * gy
        gdecay = adj_t * decayed
        ddelta = gB * u + tl.sum(gdecay * A3, axis=1)
        dA += tl.sum(gdecay * delta[:, None, :], axis=2)
        _reduce_into(DB, tl.sum(adj_t * (delta * u)[:, None, :], axis=0), b, g, G, n, t, L, valid, DIM, BD, N,
                     PARTIAL)
        if SOFTPLUS:
            ddelta = tl.where(raw > 20.0, ddelta, ddelta / (1.0 + tl.exp(-raw)))
        ddelta = tl.where(valid[None, :], ddelta, 0.0)
        dbias += tl.sum(ddelta, axis=1)
        off = (b * DIM + d[:, None]) * L + t[None, :]
        tl.store(DU + off, du, mask=valid[None, :])
        tl.store(DDT + off, ddelta, mask=valid[None, :])
    tl.store(DA + (b * DIM + d[:, None]) * N + n[None, :], dA)
    tl.store(DD + b * DIM + d, dD)
    tl.store(DBIAS + b * DIM + d, dbias)


def _block(dim_per_group: int, key: str) -> int:
    """Channels per program: CONFIG[key], halved until it divides a group's channels (a program reads one
    group's B and C)."""
    bd = CONFIG[key]
    while dim_per_group % bd:
        bd //= 2
    return bd


def _geometry(u, B, key):
    batch, dim, length = u.shape
    groups = B.shape[1]
    bd = _block(dim // groups, key)
    bt = CONFIG["BT"]
    return batch, dim, length, groups, bd, bt, triton.cdiv(length, bt)


def _compute_dtype(u):
    return tl.float64 if u.dtype == torch.float64 else tl.float32


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()]


def chunking(programs: int, tiles: int) -> tuple[int, int]:
    """(chunks, tiles per chunk) for a forward of ``programs`` programs over ``tiles`` tiles: one chunk when there
    are CONFIG["chunk_programs"] programs already, else enough chunks to reach it (at most one per tile)."""
    want = CONFIG.get("chunk_programs", 0)
    if programs >= want or programs == 0 or tiles <= 1:
        return 1, tiles
    per_chunk = triton.cdiv(tiles, min(tiles, triton.cdiv(want, programs)))
    return triton.cdiv(tiles, per_chunk), per_chunk


def forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse_groups, save_states):
    """(y [batch, D, L] in u's dtype, last state [batch, D, N], entry states or None). B, C [batch, G, N, L]."""
    batch, dim, length, groups, bd, bt, tiles = _geometry(u, B, "BD")
    n = A.shape[1]
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    y = torch.empty_like(u, memory_format=torch.contiguous_format)
    last = u.new_empty(batch, dim, n, dtype=acc)
    states = u.new_empty(batch, dim, tiles, n, dtype=acc) if save_states else last
    dummy = u
    chunks, per_chunk = chunking(batch * (dim // bd), tiles)
    ends, prods = (u.new_empty(batch, dim, chunks, n, dtype=acc) for _ in range(2)) if chunks > 1 else (last, last)
    common = dict(N=n, BD=bd, BT=bt, HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
                  CDT=_compute_dtype(u), num_warps=CONFIG["warps"])
    if chunks > 1:   # the last chunk's end is never read: no program for it
        _chunk_ends[(batch, dim // bd, chunks - 1)](
            u, delta, A, B, C, D if D is not None else dummy, delta_bias if delta_bias is not None else dummy,
            ends, prods, *_strides(u, delta, B, C), length, dim, dim // groups, groups - reverse_groups,
            NC=chunks, TPC=per_chunk, **common)
    _scan_fwd[(batch, dim // bd, chunks)](
        u, delta, z if z is not None else dummy, A, B, C, D if D is not None else dummy,
        delta_bias if delta_bias is not None else dummy, y, last, states, ends, prods,
        *_strides(u, delta, z if z is not None else u, B, C, y),
        length, dim, dim // groups, groups - reverse_groups,
        NT=tiles, NC=chunks, TPC=per_chunk, HAS_Z=z is not None, SAVE=save_states, **common)
    return y, last, (states if save_states else None)


def backward(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse_groups, states):
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, d delta_bias), each None where its input is None."""
    batch, dim, length, groups, bd, bt, tiles = _geometry(u, B, "bwd_BD")
    if states.shape[2] != tiles:
        raise RuntimeError(f"CONFIG['BT'] changed between forward and backward ({states.shape[2]} tiles saved)")
    n = A.shape[1]
    acc = states.dtype
    partial = CONFIG["partials"]
    du, ddelta = (torch.empty(u.shape, dtype=t.dtype, device=u.device) for t in (u, delta))
    dz = torch.empty(z.shape, dtype=z.dtype, device=u.device) if z is not None else None
    dA = u.new_empty(batch, dim, n, dtype=acc)
    dD, dbias = (u.new_empty(batch, dim, dtype=acc) for _ in range(2))
    if partial:   # every element written by its program: no zeroing
        dB, dC = (u.new_empty(batch, dim // bd, n, length, dtype=acc) for _ in range(2))
    else:
        dB, dC = (u.new_zeros(batch, groups, n, length, dtype=acc) for _ in range(2))
    dummy = u
    _scan_bwd[(batch, dim // bd)](
        u, delta, z if z is not None else dummy, A, B, C, D if D is not None else dummy,
        delta_bias if delta_bias is not None else dummy, states, dout,
        du, ddelta, dz if dz is not None else dummy, dA, dB, dC, dD, dbias,
        *_strides(u, delta, z if z is not None else u, B, C, dout),
        length, dim, groups, dim // groups, groups - reverse_groups,
        NT=tiles, N=n, BD=bd, BT=bt, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=delta_softplus, CDT=_compute_dtype(u), PARTIAL=partial, num_warps=CONFIG["bwd_warps"])
    if partial:
        dB, dC = (t.view(batch, groups, -1, n, length).sum(2) for t in (dB, dC))
    return (du, ddelta, dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            dD.sum(0).to(D.dtype) if D is not None else None, dz,
            dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else None)


def _fits_int32(B, *tensors) -> bool:
    """Whether every element offset the kernels form (int32 arithmetic) stays below 2^31: each tensor's furthest
    element by its strides, and the backward's own buffers (the saved states, the dB / dC partials)."""
    batch, dim, length = tensors[0].shape
    n = B.shape[2]
    partials = batch * (dim // _block(dim // B.shape[1], "bwd_BD")) * n * length
    states = batch * dim * triton.cdiv(length, CONFIG["BT"]) * n
    furthest = [sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
                for t in (B, *tensors) if t is not None]
    return max(furthest + [partials, states, batch * dim * length]) < 2 ** 31   # the last: du, ddelta, dz, y


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse_groups, save):
        # the kernels index A [D, N], D and delta_bias [D] as contiguous
        A, D, delta_bias = (None if t is None else t.contiguous() for t in (A, D, delta_bias))
        y, last, states = forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse_groups, save)
        ctx.options = (delta_softplus, reverse_groups)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.mark_non_differentiable(last)
        return y, last

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlast):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        grads = backward(dout, u, delta, A, B, C, D, z, delta_bias, *ctx.options, states)
        return (*grads, None, None, None)


def check_device(device: torch.device) -> None:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the triton scan backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, reverse_groups=0):
    """(y, last state): ops/scan.py's contract; B, C [batch, N, L] or grouped [batch, G, N, L]; the last
    ``reverse_groups`` groups run backwards in time (their "last" state is the one after t = 0)."""
    check_device(u.device)
    grouped = B.dim() == 4
    if not grouped:
        B, C = B[:, None], C[:, None]
    if not 0 <= reverse_groups <= B.shape[1]:
        raise ValueError(f"reverse_groups={reverse_groups} must be within 0..G={B.shape[1]}")
    n = A.shape[1]
    if n & (n - 1):
        raise ValueError(f"the triton scan needs a power-of-two d_state, got N={n}")
    if not _fits_int32(B, u, delta, z, C):
        raise ValueError(f"the triton scan indexes with int32: u {tuple(u.shape)} with d_state {n} is too large "
                         "for it (split the batch, or use backend='cuda')")
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    return _TritonScan.apply(*inputs, delta_softplus, reverse_groups, save)
