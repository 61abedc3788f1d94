"""The chunked inference scan's two sequential passes in Gluon: one thread a channel, all its N states in registers.

Why: the Triton passes (_scan_chunked.py) let the compiler lay a program's [channels, N] state out, and it spreads N
across a warp's lanes: every step's sum over N for y is a round of shuffles, and picking a step's column out of the
loaded tiles goes through shared memory with barriers (session 16's ptxas counts: 25 / 40 shuffles, 10 / 17 barriers
and 59 / 80 shared-memory accesses a block of steps around 76 / 68 exp2; base's outputs pass ran at 0.53 us a step,
about a quarter of the exp unit's rate). Gluon (Triton's explicit-layout dialect) fixes the layout instead:

    [BD, N] state        thread d holds channel d's N states             (BlockedLayout [1, N] per thread)
    [BD, TS] u, delta, z thread d holds its channel's TS steps           (the step's column: a register pick)
    [TS, N] B, C         loaded coalesced, put in shared memory; a step's row read by every thread (a broadcast)

so a step is N exp2 and 2-3 N FMAs per thread, the sum over N for y stays in the thread, and the only barriers are
two a block of TS steps (around the shared B / C rows). A program is ``W`` warps = 32 W channels x one chunk;
chunks are whole blocks of TS steps, so a block never crosses a chunk. A program whose group runs backwards walks
its blocks from the sequence's end and each block's columns from the last (a constexpr branch: both walks compiled).

Same arguments, outputs and chunk states as the Triton passes (the chunk prefix between them is theirs); float32
compute for bf16 / fp16 / fp32 inputs; CUDA only (Gluon has no CPU interpreter: its checks are the GPU tests against
float64 and, on CPU, an ahead-of-time compile for sm_90, benchmarks/kernel_resources.py --chunked-scan-gluon).
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

LOG2E = gl.constexpr(1.4426950408889634)


@gluon.jit
def _softplus(x):
    return gl.where(x > 20.0, x, gl.log(1.0 + gl.exp(x)))


@gluon.jit
def _pick(tile, s, i: gl.constexpr, TS: gl.constexpr, REV: gl.constexpr, ROW: gl.constexpr):
    """The i-th step's column (from the last when REV) of a [BD, TS] tile whose rows each live in one thread: a
    register pick (the select folds), as [BD] in the state's row layout (the same threads: a trivial conversion)."""
    if REV:
        col: gl.constexpr = TS - 1 - i
    else:
        col: gl.constexpr = i
    return gl.convert_layout(gl.sum(gl.where(gl.expand_dims(s, 0) == col, tile, 0.0), axis=1), ROW,
                             assert_trivial=True)


@gluon.jit
def _put(tile, s, v, i: gl.constexpr, TS: gl.constexpr, REV: gl.constexpr, LT: gl.constexpr):
    """tile with the i-th step's column (from the last when REV) set to v [BD] (state row layout)."""
    if REV:
        col: gl.constexpr = TS - 1 - i
    else:
        col: gl.constexpr = i
    v = gl.convert_layout(v, gl.SliceLayout(1, LT), assert_trivial=True)
    return gl.where(gl.expand_dims(s, 0) == col, gl.expand_dims(v, 1), tile)


@gluon.jit
def _row(smem, i: gl.constexpr, TS: gl.constexpr, REV: gl.constexpr, N: gl.constexpr, COL: gl.constexpr):
    """A block's i-th step's row (from the last when REV) of a [TS, N] tile kept flat in shared memory, read whole
    by every thread (one address across the warp: a broadcast)."""
    if REV:
        start: gl.constexpr = (TS - 1 - i) * N
    else:
        start: gl.constexpr = i * N
    return smem.slice(start, N).load(COL)


@gluon.jit
def _walk(U, DT, Z, Bm, Cm, Dv, BIAS, Y, h, A2, b, g, c, L,
          su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l, sB_b, sB_g, sB_n, sB_l,
          sC_b, sC_g, sC_n, sC_l, sy_b, sy_d, sy_l, d_lo,
          LC: gl.constexpr, N: gl.constexpr, W: gl.constexpr, TS: gl.constexpr, TPT: gl.constexpr,
          OUTPUTS: gl.constexpr, REV: gl.constexpr, HAS_D: gl.constexpr, HAS_Z: gl.constexpr,
          HAS_BIAS: gl.constexpr, SOFTPLUS: gl.constexpr):
    """Chunk c's LC steps from state h (REV: times L - 1 - j): the state at the chunk's end and the sum of delta;
    OUTPUTS: y_t = <C_t, h_t> + D u_t (times silu(z_t)) stored as it goes."""
    BD: gl.constexpr = 32 * W
    LH: gl.constexpr = gl.BlockedLayout([1, N], [32, 1], [W, 1], [1, 0])
    LT: gl.constexpr = gl.BlockedLayout([1, TS], [32, 1], [W, 1], [1, 0])
    LS: gl.constexpr = gl.BlockedLayout([1, 1], [TPT, 32 // TPT], [1, W], [0, 1])
    SMEM: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    ROW: gl.constexpr = gl.SliceLayout(1, LH)
    COL: gl.constexpr = gl.SliceLayout(0, LH)

    s = gl.arange(0, TS, layout=gl.SliceLayout(0, LT))
    dt_ = d_lo + gl.arange(0, BD, layout=gl.SliceLayout(1, LT))
    ts_ = gl.arange(0, TS, layout=gl.SliceLayout(1, LS))
    ns_ = gl.arange(0, N, layout=gl.SliceLayout(0, LS))
    if HAS_BIAS:
        bias = gl.load(BIAS + dt_).to(gl.float32)
    if HAS_D:
        dd = gl.load(Dv + dt_).to(gl.float32)
    sB = gl.allocate_shared_memory(gl.float32, [TS * N], SMEM)   # [TS, N] row-major: a step's row is a slice
    sC = gl.allocate_shared_memory(gl.float32, [TS * N], SMEM)
    total = gl.zeros([BD], gl.float32, layout=ROW)
    for blk in range(LC // TS):
        j0 = c * LC + blk * TS
        if REV:
            t0 = L - j0 - TS
        else:
            t0 = j0
        tt = t0 + s
        valid = (tt >= 0) & (tt < L)
        vm = gl.expand_dims(valid, 0)
        tt2 = gl.expand_dims(tt, 0)
        d2 = gl.expand_dims(dt_, 1)
        u = gl.load(U + b * su_b + d2 * su_d + tt2 * su_l, mask=vm, other=0.0).to(gl.float32)
        raw = gl.load(DT + b * sdt_b + d2 * sdt_d + tt2 * sdt_l, mask=vm, other=0.0).to(gl.float32)
        if HAS_BIAS:
            raw += gl.expand_dims(bias, 1)
        if SOFTPLUS:
            raw = _softplus(raw)
        delta = gl.where(vm, raw, 0.0)
        du = delta * u
        tb = t0 + ts_
        vb = gl.expand_dims((tb >= 0) & (tb < L), 1)
        tb2 = gl.expand_dims(tb, 1)
        n2 = gl.expand_dims(ns_, 0)
        Bt = gl.load(Bm + b * sB_b + g * sB_g + n2 * sB_n + tb2 * sB_l, mask=vb, other=0.0).to(gl.float32)
        if OUTPUTS:
            Ct = gl.load(Cm + b * sC_b + g * sC_g + n2 * sC_n + tb2 * sC_l, mask=vb, other=0.0).to(gl.float32)
        gl.thread_barrier()   # the previous block's rows are read before they are overwritten
        sB.store(gl.reshape(Bt, [TS * N]))
        if OUTPUTS:
            sC.store(gl.reshape(Ct, [TS * N]))
        gl.thread_barrier()
        y = gl.zeros([BD, TS], gl.float32, layout=LT)
        for i in gl.static_range(TS):
            di = _pick(delta, s, i, TS, REV, ROW)
            bi = _row(sB, i, TS, REV, N, COL)
            h = gl.exp2(gl.expand_dims(di, 1) * A2) * h + gl.expand_dims(_pick(du, s, i, TS, REV, ROW), 1) \
                * gl.expand_dims(bi, 0)
            if OUTPUTS:
                ci = _row(sC, i, TS, REV, N, COL)
                y = _put(y, s, gl.sum(h * gl.expand_dims(ci, 0), axis=1), i, TS, REV, LT)
        if OUTPUTS:
            if HAS_D:
                y += gl.expand_dims(dd, 1) * u
            if HAS_Z:
                z = gl.load(Z + b * sz_b + d2 * sz_d + tt2 * sz_l, mask=vm, other=0.0).to(gl.float32)
                y = y * z / (1.0 + gl.exp(-z))
            gl.store(Y + b * sy_b + d2 * sy_d + tt2 * sy_l, y.to(Y.dtype.element_ty), mask=vm)
        else:
            total += gl.convert_layout(gl.sum(delta, axis=1), ROW, assert_trivial=True)
    return h, total


@gluon.jit
def chunk_pass(U, DT, Z, A, Bm, Cm, Dv, BIAS, HEND, PROD, Y,
               su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l, sB_b, sB_g, sB_n, sB_l,
               sC_b, sC_g, sC_n, sC_l, sy_b, sy_d, sy_l, L, DIM, DPG, REV_FROM,
               NC: gl.constexpr, LC: gl.constexpr, N: gl.constexpr, W: gl.constexpr, TS: gl.constexpr,
               TPT: gl.constexpr, OUTPUTS: gl.constexpr, HAS_D: gl.constexpr, HAS_Z: gl.constexpr,
               HAS_BIAS: gl.constexpr, SOFTPLUS: gl.constexpr):
    """OUTPUTS False, pass 1: chunk c from a zero state: its end state (HEND) and decay product exp(A sum delta)
    (PROD), [batch, D, NC, N]. OUTPUTS True, pass 3: chunk c from the state chunk c - 1 ends with (HEND after the
    prefix; zero for c = 0), writing y; with NC = 1 the last state goes to HEND. Program = (batch x channel block
    of 32 W, chunk)."""
    BD: gl.constexpr = 32 * W
    LH: gl.constexpr = gl.BlockedLayout([1, N], [32, 1], [W, 1], [1, 0])
    nb = DIM // BD
    b = gl.program_id(0) // nb
    d_lo = (gl.program_id(0) % nb) * BD
    c = gl.program_id(1)
    g = d_lo // DPG
    d2 = gl.expand_dims(d_lo + gl.arange(0, BD, layout=gl.SliceLayout(1, LH)), 1)
    n2 = gl.expand_dims(gl.arange(0, N, layout=gl.SliceLayout(0, LH)), 0)
    A2 = gl.load(A + d2 * N + n2).to(gl.float32) * LOG2E
    if OUTPUTS:
        start = ((b * DIM + d2) * NC + c - 1) * N + n2
        h = gl.load(HEND + start, mask=(n2 < N) & (c > 0), other=0.0)
    else:
        h = gl.zeros([BD, N], gl.float32, layout=LH)
    if g >= REV_FROM:
        h, total = _walk(U, DT, Z, Bm, Cm, Dv, BIAS, Y, h, A2, b, g, c, L, su_b, su_d, su_l, sdt_b, sdt_d, sdt_l,
                         sz_b, sz_d, sz_l, sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l, sy_b, sy_d, sy_l, d_lo,
                         LC, N, W, TS, TPT, OUTPUTS, True, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS)
    else:
        h, total = _walk(U, DT, Z, Bm, Cm, Dv, BIAS, Y, h, A2, b, g, c, L, su_b, su_d, su_l, sdt_b, sdt_d, sdt_l,
                         sz_b, sz_d, sz_l, sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l, sy_b, sy_d, sy_l, d_lo,
                         LC, N, W, TS, TPT, OUTPUTS, False, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS)
    if OUTPUTS:
        if NC == 1:
            gl.store(HEND + (b * DIM + d2) * N + n2, h)
    else:
        off = ((b * DIM + d2) * NC + c) * N + n2
        gl.store(HEND + off, h)
        gl.store(PROD + off, gl.exp2(gl.expand_dims(total, 1) * A2))
