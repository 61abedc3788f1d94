"""Pure-PyTorch selective scan: a chunked linear scan with a hand-written backward, blocked for the CPU cache.

The recurrence h_t = a_t h_{t-1} + b_t (a_t = exp(delta_t A), b_t = delta_t u_t B_t) is cut into K chunks of
Q ~ sqrt(L) steps; one in-place op advances step j of every chunk, so a pass is Q Python steps, not L.
A pass from zero gives each chunk's end state, a K-step loop carries it across chunks, a second pass redoes the
steps from the true entry states. Only products of real decays are formed (no exp(-cumsum(delta A)) as in a
log-space scan), so large delta * |A| can underflow to 0 but never overflow.

Why it is fast on CPU, where this is memory-bound (exp aside):
* a_t is computed once per direction, in bulk: one exp2 per element in the forward and one in the backward.
* Work goes one block of (batch rows x chunks, every channel) at a time through a few ~6 MB buffers reused across
  blocks and calls (a thread-local workspace): the working set stays in L3 and the big transients are not freshly
  allocated (first-touch page faults on new temporaries were much of the old cost). Blocks follow time, carrying
  the state forwards (and the adjoint backwards) from one block to the next. The workspace lives as long as the
  thread: 3 block buffers plus up to 9 time-major [b, L, D] buffers, each capped at 4 x BLOCK_ELEMS (larger ones
  are allocated per call), so at most ~25 MB + 9 x [b, L, D] floats (e.g. 22 MB at tiny's width, batch 1).
* Inputs are transposed once to time-major [batch, L, channels]: channels, all of them, are the contiguous inner
  dimension of every op, and every per-step slice is contiguous.
* Delta bias, softplus, the D skip and the z gate are fused into the autograd function, through the same
  workspace; results and gradients are returned as [b, D, L] views of time-major tensors (no transpose back).
* The backward keeps nothing of size [batch, D, N, L] beyond the block buffers: it recomputes the states from
  the chunk-entry states saved by the forward, gets each chunk's adjoint from zero (Horner), carries it across
  chunks, runs gh_t = C_t gy_t + a_{t+1} gh_{t+1} into a_{t+1}'s slot, and reduces the gradients in bulk.
"""
from __future__ import annotations

import math
import threading

import torch

# CPU block size in elements (rows x chunk steps x d_state x channels); three such fp32 buffers (~6 MB each) are
# live in the backward. 1.5M was best on a 2-core, 32 MB-L3 machine (0.5M, 1M, 2M slightly and 4M clearly slower).
BLOCK_ELEMS = 3 << 19
LOG2E = 1.0 / math.log(2.0)   # exp2 is ~3x faster than exp on CPU (AVX-512, torch 2.13), within ~2 ulp of it
_tls = threading.local()
# workspace slots: 0-2 the block buffers, _DU a block's delta * u, the others [b, padded, D] time-major transients
_U, _Y, _DU, _GDU, _GDA, _TMP, _DT, _Z, _RAW = 3, 4, 5, 6, 7, 8, 9, 10, 11


def _workspace(slot: int, numel: int, like: torch.Tensor) -> torch.Tensor:
    """A flat scratch buffer reused across calls on CPU (per thread, dtype and slot); fresh on other devices."""
    if like.device.type != "cpu" or numel > 4 * BLOCK_ELEMS:
        return like.new_empty(numel)
    cache = getattr(_tls, "buffers", None)
    if cache is None:
        cache = _tls.buffers = {}
    key = (slot, like.dtype)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        cache.pop(key, None)
        buf = cache[key] = like.new_empty(numel)
    return buf[:numel]


def _geometry(length: int) -> tuple[int, int]:
    """(Q steps per chunk, K chunks): Q near sqrt(L) (time was flat for Q in 20..49 at L = 1568), least padding."""
    root = max(1, math.isqrt(length))
    size = min(range(max(1, (2 * root) // 3), (3 * root) // 2 + 1),
               key=lambda q: (q * -(-length // q), abs(q - root)))
    return size, -(-length // size)


def _blocks(batch: int, n: int, dim: int, size: int, chunks: int, device: torch.device):
    """(r0, r1, k0, k1) blocks of batch rows x chunks, each with every channel, in time order within a row range.

    Channels stay whole so the contiguous inner dimension of every op is D (vectorises well); time is cut at chunk
    boundaries and the scan state (or, backwards, the adjoint) is carried from one block to the next."""
    per_chunk = size * n * dim
    if device.type != "cpu" or batch * chunks * per_chunk <= BLOCK_ELEMS:
        return [(0, batch, 0, chunks)]
    rows = max(1, min(batch, BLOCK_ELEMS // (chunks * per_chunk)))           # whole rows, when several fit
    span = chunks if rows > 1 else max(1, BLOCK_ELEMS // per_chunk)
    nblk = -(-chunks // span)
    span = -(-chunks // nblk)                                                  # even spans
    return [(r0, min(batch, r0 + rows), k0, min(chunks, k0 + span))
            for r0 in range(0, batch, rows) for k0 in range(0, chunks, span)]


def _time_major(x: torch.Tensor, padded: int, slot: int | None = None) -> torch.Tensor:
    """[b, C, L] -> [b, padded, C] contiguous, zero beyond L (delta = 0 there: a = 1 and b = 0, a no-op).
    With a ``slot`` the result lives in that workspace buffer: transient, never returned or saved."""
    b, c, length = x.shape
    out = x.new_empty(b, padded, c) if slot is None else _workspace(slot, b * padded * c, x).view(b, padded, c)
    out[:, :length].copy_(x.transpose(1, 2))
    if padded > length:
        out[:, length:].zero_()
    return out


def _steps(xt: torch.Tensor, size: int, chunks: int) -> torch.Tensor:
    """[b, K*Q, C] -> view [Q, b, K, C]: index j is step j of every chunk."""
    b, _, c = xt.shape
    return xt.view(b, chunks, size, c).permute(2, 0, 1, 3)


def _channel_major(xt: torch.Tensor, length: int) -> torch.Tensor:
    """[b, K*Q, C] -> a new [b, C, L] tensor (always a copy: xt may be a workspace buffer)."""
    b, _, c = xt.shape
    out = xt.new_empty(b, c, length)
    out.copy_(xt[:, :length].transpose(1, 2))
    return out


def _forward(dt, ut, Bt, Ct, A, length):
    """Time-major inputs [b, K*Q, .]; returns y (time-major, a workspace), last state [b, D, N], chunk-entry
    states [b, K, N, D]."""
    batch, padded, dim = dt.shape
    n = A.shape[1]
    size, chunks = _geometry(length)
    dl = _steps(dt, size, chunks).unsqueeze(-2)                                # [Q, b, K, 1, D]
    ul = _steps(ut, size, chunks).unsqueeze(-2)
    bl = _steps(Bt, size, chunks).unsqueeze(-1)                                # [Q, b, K, N, 1]
    cl = _steps(Ct, size, chunks)                                              # [Q, b, K, N]
    A2 = A.t().contiguous() * LOG2E       # [N, D], a new tensor (A.t() may be contiguous): exp(x A) = exp2(x A log2 e)
    decay = torch.mul(dl.sum(0), A2).exp2_()                                   # whole-chunk decay [b, K, N, D]
    yt = _workspace(_Y, dt.numel(), dt).view_as(dt)
    ys = _steps(yt, size, chunks)
    h_in_all = dt.new_empty(batch, chunks, n, dim)
    last = dt.new_empty(batch, dim, n)
    blocks = _blocks(batch, n, dim, size, chunks, dt.device)
    most = max((r1 - r0) * (k1 - k0) for r0, r1, k0, k1 in blocks) * size * n * dim
    w_all, s_all = _workspace(0, most, dt), _workspace(1, most, dt)
    du_all = _workspace(_DU, most // n, dt)
    for r0, r1, k0, k1 in blocks:
        bb, kb = r1 - r0, k1 - k0
        m = size * bb * kb
        W = w_all[: m * n * dim].view(size, bb, kb, n, dim)
        S = s_all[: m * n * dim].view(size, bb, kb, n, dim)
        torch.mul(dl[:, r0:r1, k0:k1], A2, out=W).exp2_()                      # a_t, every step of the block
        du = torch.mul(dl[:, r0:r1, k0:k1], ul[:, r0:r1, k0:k1], out=du_all[: m * dim].view(size, bb, kb, 1, dim))
        torch.mul(du, bl[:, r0:r1, k0:k1], out=S)                              # b_t = delta_t u_t B_t
        ws, ss = W.unbind(0), S.unbind(0)
        h = ss[0].clone()                                                      # pass 1: chunk ends from zero
        for j in range(1, size):
            torch.addcmul(ss[j], h, ws[j], out=h)
        h_in = h_in_all[r0:r1, k0:k1]                                          # carry across chunks
        if k0 == 0:
            h_in[:, 0] = 0
        else:
            torch.addcmul(carry_h, decay[r0:r1, k0 - 1], h_in_all[r0:r1, k0 - 1], out=h_in[:, 0])
        for k in range(kb - 1):
            torch.addcmul(h[:, k], decay[r0:r1, k0 + k], h_in[:, k], out=h_in[:, k + 1])
        carry_h = h[:, -1]                                                     # chunk k1 - 1's end from zero
        prev = h_in
        for j in range(size):                                                  # pass 2: true states, into S
            prev = torch.addcmul(ss[j], ws[j], prev, out=ss[j])
        if k1 == chunks:
            last[r0:r1] = prev[:, -1].transpose(1, 2)                          # padding keeps the state
        cb = cl[:, r0:r1, k0:k1].contiguous()
        ys[:, r0:r1, k0:k1] = torch.bmm(cb.view(m, 1, n), S.view(m, n, dim)).view(size, bb, kb, dim)  # <C_t, h_t>
    return yt, last, h_in_all


def _backward(dt, ut, Bt, Ct, A, h_in_all, gyt, length):
    """Time-major gy; returns time-major (dL/d(delta u), dL/d(delta) through exp(delta A)) (workspaces), gA [D, N]
    and channel-major gB, gC [b, N, L]."""
    batch, padded, dim = dt.shape
    n = A.shape[1]
    size, chunks = _geometry(length)
    dl, ul, gyl = (_steps(x, size, chunks).unsqueeze(-2) for x in (dt, ut, gyt))     # [Q, b, K, 1, D]
    bl = _steps(Bt, size, chunks)                                              # [Q, b, K, N]
    cl = _steps(Ct, size, chunks).unsqueeze(-1)                                # [Q, b, K, N, 1]
    At = A.t().contiguous()
    A2 = At * LOG2E
    decay = torch.mul(dl.sum(0), A2).exp2_()                                   # [b, K, N, D]
    gdut = _workspace(_GDU, dt.numel(), dt).view_as(dt)
    gdAt = _workspace(_GDA, dt.numel(), dt).view_as(dt)
    gdus, gdAs = _steps(gdut, size, chunks), _steps(gdAt, size, chunks)       # [Q, b, K, D]
    gB = dt.new_empty(size, batch, chunks, n)
    gC = dt.new_empty(size, batch, chunks, n)
    gAt = dt.new_zeros(n, dim)
    blocks = _blocks(batch, n, dim, size, chunks, dt.device)
    most = max((r1 - r0) * (k1 - k0) for r0, r1, k0, k1 in blocks) * size * n * dim
    w_all = _workspace(0, most + most // size, dt)
    t_all, h_all = _workspace(1, most, dt), _workspace(2, most, dt)
    du_all = _workspace(_DU, most // n, dt)
    for r0, r1, k0, k1 in reversed(blocks):                                    # adjoints run backwards in time
        bb, kb = r1 - r0, k1 - k0
        m = size * bb * kb
        numel = m * n * dim
        W = w_all[: numel + numel // size].view(size + 1, bb, kb, n, dim)      # a_t, then gh_{t-1} in slot t
        T = t_all[:numel].view(size, bb, kb, n, dim)                           # h_t
        H = h_all[:numel].view(size, bb, kb, n, dim)                           # C_t gy_t, then a_t h_{t-1}
        blk = (slice(None), slice(r0, r1), slice(k0, k1))
        dlb, gyb = dl[blk], gyl[blk]
        dub = torch.mul(dlb, ul[blk], out=du_all[: m * dim].view(size, bb, kb, 1, dim))   # delta_t u_t
        torch.mul(dlb, A2, out=W[:size]).exp2_()                               # a_t
        torch.mul(dub, bl[blk].unsqueeze(-1), out=T)                           # b_t = du_t B_t
        ws, ts, hs = W.unbind(0), T.unbind(0), H.unbind(0)
        h_in = h_in_all[r0:r1, k0:k1]
        prev = h_in
        for j in range(size):                                                  # states again, from the saved entries
            prev = torch.addcmul(ts[j], prev, ws[j], out=ts[j])
        torch.mul(cl[blk], gyb, out=H)                                         # C_t gy_t
        g0 = hs[-1].clone()                                                    # adjoint at each chunk's first step,
        for j in range(size - 2, -1, -1):                                      # from zero inside the chunk (Horner)
            torch.addcmul(hs[j], g0, ws[j + 1], out=g0)
        e = g0.mul_(ws[0])                                                     # what each chunk sends to the one before
        G = torch.empty_like(e)                                                # adjoint entering each chunk's last step
        if k1 == chunks:                                                       # from the chunks after it
            G[:, -1] = 0
        else:
            torch.addcmul(carry_e, decay[r0:r1, k1], carry_g, out=G[:, -1])
        dk = decay[r0:r1, k0:k1]
        for k in range(kb - 2, -1, -1):
            torch.addcmul(e[:, k + 1], dk[:, k + 1], G[:, k + 1], out=G[:, k])
        carry_e, carry_g = e[:, 0], G[:, 0]                                    # for the block before this one
        # gh_j into W[j + 1] (a_{j+1}'s slot, free once used); H_j <- a_j h_{j-1} (C_j gy_j's slot, just used)
        torch.add(G, hs[-1], out=ws[size])
        torch.mul(ws[size - 1], ts[size - 2] if size > 1 else h_in, out=hs[size - 1])
        for j in range(size - 2, -1, -1):
            torch.addcmul(hs[j], ws[j + 1], ws[j + 2], out=ws[j + 1])
            torch.mul(ws[j], ts[j - 1] if j > 0 else h_in, out=hs[j])
        gh = W[1:]
        torch.sum(T.mul_(gyb), -1, out=gC[blk])                                # sum_d h gy
        gdus[blk] = torch.bmm(bl[blk].contiguous().view(m, 1, n), gh.view(m, n, dim)).view(size, bb, kb, dim)
        torch.sum(torch.mul(gh, dub, out=T), -1, out=gB[blk])                  # sum_d gh du
        H.mul_(gh)                                                   # X_t = gh_t a_t h_{t-1}: dL/d(delta_t A)
        torch.sum(torch.mul(H, At, out=T), dim=3, out=gdAs[blk])
        gAt += H.mul_(dlb).sum((0, 1, 2))
    gBt = gB.permute(1, 2, 0, 3).reshape(batch, padded, n)
    gCt = gC.permute(1, 2, 0, 3).reshape(batch, padded, n)
    return gdut, gdAt, gAt.t().contiguous(), _channel_major(gBt, length), _channel_major(gCt, length)


def _final_delta(delta, bias, softplus: bool, padded: int, keep_raw: bool = False):
    """softplus(delta + bias) (F.softplus's threshold 20, as mamba's kernel), time-major [b, padded, D] in the
    _DT workspace, zero on the padding steps. With keep_raw, also returns delta + bias (the _RAW workspace)."""
    b, dim, length = delta.shape
    dt = _workspace(_DT, b * padded * dim, delta).view(b, padded, dim)
    dt[:, length:] = 0
    raw = _workspace(_RAW, b * length * dim, delta).view(b, length, dim) if keep_raw and softplus else dt[:, :length]
    if bias is not None:
        torch.add(delta.transpose(1, 2), bias, out=raw)                       # transpose and bias in one pass
    else:
        raw.copy_(delta.transpose(1, 2))
    if softplus:
        torch.ops.aten.softplus.out(raw, 1, 20, out=dt[:, :length])           # in place unless raw is kept
    return (dt, raw) if keep_raw else dt


def _silu_time_major(z: torch.Tensor, padded: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, silu(z)) time-major [b, padded, D] in the _Z and _TMP workspaces (transient)."""
    zt = _time_major(z, padded, slot=_Z)
    return zt, torch.sigmoid(zt, out=_workspace(_TMP, zt.numel(), zt).view_as(zt)).mul_(zt)


def _output(like: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A new time-major [b, L, D] gradient and its [b, D, L] view, returned as is: a transpose back to
    channel-major costs a full strided pass, and the model's next op transposes it to time-major again."""
    b, _, dim = like.shape
    out_t = like.new_empty(b, length, dim)
    return out_t.transpose(1, 2), out_t


def forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """out = (y + D u) * silu(z), y[b,d,l] = sum_n C[b,n,l] h[b,d,n,l], delta = softplus(delta + bias) (the
    softplus only with delta_softplus; D, z and bias optional). No autograd: a plain function, so that both the
    eager autograd function below and the torch.compile custom op (ops/scan.py) run the same code.

    Returns (out time-major [b, L, D], last state [b, D, N], chunk-entry states h_in [b, K, N, D], pre-gate y
    time-major [b, L, D]); with z None the last is ``out`` itself. The backward takes h_in and (with z) y."""
    length = u.shape[-1]
    size, chunks = _geometry(length)
    padded = size * chunks
    with torch.no_grad():
        dt = _final_delta(delta, delta_bias, delta_softplus, padded)
        ut = _time_major(u, padded, slot=_U)
        yt, last, h_in = _forward(dt, ut, _time_major(B, padded), _time_major(C, padded), A, length)
        y_t = yt.new_empty(yt.shape[0], length, yt.shape[2])                 # time-major results: see scan()
        if D is not None:
            torch.addcmul(yt[:, :length], ut[:, :length], D, out=y_t)          # + D u
        else:
            y_t.copy_(yt[:, :length])
        out_t = y_t if z is None else torch.mul(y_t, _silu_time_major(z, padded)[1][:, :length])
    return out_t, last, h_in, y_t


def backward(gout, u, delta, A, B, C, h_in, D, z, y_t, delta_bias, delta_softplus, need_gD=True, need_gz=True,
             need_gbias=True):
    """The gradients (gu, gdelta, gA, gB, gC, gD, gz, gbias) from gout (time-major [b, L, D]) and what
    :func:`forward` returned (h_in; y_t only with z). gD, gz, gbias are None when their input is (or not needed);
    gu, gdelta and gz are [b, D, L] views of time-major tensors."""
    length = u.shape[-1]
    size, chunks = _geometry(length)
    padded = size * chunks
    gD = gz = gbias = None
    with torch.no_grad():
        dt, raw = _final_delta(delta, delta_bias, delta_softplus, padded, keep_raw=True)
        gout = gout.to(dt.dtype)
        gyt = _workspace(_Y, dt.numel(), dt).view_as(dt)
        if z is not None:
            zt, st = _silu_time_major(z, padded)
            torch.mul(gout, st[:, :length], out=gyt[:, :length])
            if need_gz:                                                         # gout * y * silu'(z)
                gy_pre = torch.mul(gout, y_t, out=st[:, :length])
                gz = torch.ops.aten.silu_backward(gy_pre, zt[:, :length]).transpose(1, 2)
        else:
            gyt[:, :length].copy_(gout)
        gyt[:, length:] = 0
        ut = _time_major(u, padded, slot=_U)
        gdut, gdAt, gA, gB, gC = _backward(dt, ut, _time_major(B, padded), _time_major(C, padded), A, h_in,
                                           gyt, length)
        if D is not None and need_gD:
            gD = torch.mul(gyt, ut, out=_workspace(_TMP, dt.numel(), dt).view_as(dt)).sum((0, 1))
        gdAt.addcmul_(gdut, ut)                                                 # dL/d(final delta): + gdu * u
        gu, gu_t = _output(gdut, length)
        if D is not None:
            torch.addcmul(gdut.mul_(dt)[:, :length], gyt[:, :length], D, out=gu_t)   # gdu * delta + gy * D
        else:
            torch.mul(gdut[:, :length], dt[:, :length], out=gu_t)
        gdelta, gdelta_t = _output(gdAt, length)
        if delta_softplus:                                                      # sigmoid(raw), 1 above 20
            torch.ops.aten.softplus_backward.grad_input(gdAt[:, :length], raw, 1, 20, grad_input=gdelta_t)
        else:
            gdelta_t.copy_(gdAt[:, :length])
        if delta_bias is not None and need_gbias:
            gbias = gdelta.sum((0, 2))
    return gu, gdelta, gA, gB, gC, gD, gz, gbias


def state_shapes(u: torch.Tensor, A: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(last state, chunk-entry states) shapes that :func:`forward` returns: what a fake (meta) impl needs."""
    batch, dim, length = u.shape
    return (batch, dim, A.shape[1]), (batch, _geometry(length)[1], A.shape[1], dim)


class _SelectiveScan(torch.autograd.Function):
    """:func:`forward` and :func:`backward` for eager autograd. Returns out time-major, [b, L, D].

    The bias, softplus, skip and gate are fused here, not left to autograd, because on CPU each of them as a
    separate op costs a pass and a freshly allocated (page-faulted) [b, D, L] tensor, forward and backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        out_t, last, h_in, y_t = forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        # the backward recomputes the final delta (cheaper than a fresh [b, L, D] tensor kept alive between the
        # two); h_in (the chunk-entry states, [b, K, N, D]) spares it a pass
        ctx.save_for_backward(u, delta, A, B, C, h_in, D, z, y_t if z is not None else None, delta_bias)
        ctx.delta_softplus = delta_softplus
        ctx.mark_non_differentiable(last)
        return out_t, last

    @staticmethod
    def backward(ctx, gout, _glast):                                           # gout: time-major [b, L, D]
        u, delta, A, B, C, h_in, D, z, y_t, delta_bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        return (*backward(gout, u, delta, A, B, C, h_in, D, z, y_t, delta_bias, ctx.delta_softplus,
                          need_gD=needs[5], need_gz=needs[6], need_gbias=needs[7]), None)


def scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Returns (out [batch, D, L], last state [batch, D, N]); gradients for every tensor argument.

    ``out`` is a transposed view of a time-major [batch, L, D] tensor, not contiguous: the model's next op
    transposes it back to time-major, so a copy to channel-major would be a wasted pass. The transpose happens
    here, outside the autograd function, so in-place ops on ``out`` work as on any tensor."""
    out_t, last = _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return out_t.transpose(1, 2), last
