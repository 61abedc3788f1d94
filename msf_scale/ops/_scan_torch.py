"""Pure-PyTorch selective scan: a chunked scan, fused so that no [batch, D, N, L] tensor exists in the forward.

The recurrence h_t = a_t h_{t-1} + b_t (a_t = exp(delta_t A), b_t = delta_t u_t B_t) is cut into ~sqrt(L) chunks
of ~sqrt(L) steps. One vectorised step advances every chunk at once, building a_t and b_t for just that slice:
pass 1 finds each chunk's end state from zero, a short scan over chunks turns those into each chunk's true
initial state, and pass 2 re-runs the steps from there, contracting with C as it goes. That is ~2 sqrt(L)
Python steps instead of L, over slices that stay in cache; the log-depth (Hillis-Steele) form was measured
3-10x slower on CPU because it streams the whole state tensor log2(L) times.

Backward recomputes the states (nothing large is saved) and runs the adjoint recurrence
gh_t = C_t gy_t + a_{t+1} gh_{t+1} with the same routine on the reversed sequence, as mamba-ssm's kernel does.
"""
from __future__ import annotations

import math

import torch


def _chunked(x: torch.Tensor, chunks: int, size: int) -> torch.Tensor:
    """[b, C, L] -> step-major [size, b, C, chunks], zero-padded (a zero delta means a = 1, b = 0: padding is a
    no-op). Step-major makes every per-step slice contiguous, which is what keeps the steps fast."""
    pad = chunks * size - x.shape[-1]
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], chunks, size).permute(3, 0, 1, 2).contiguous()


def fused_scan(delta, du, Bm, A, C=None):
    """States of h_t = exp(delta_t A) h_{t-1} + du_t B_t (h_{-1} = 0), contracted with C or returned whole.

    delta, du: [b, D, L]; Bm, C: [b, N, L]; A: [D, N]. Returns (y [b, D, L], last state [b, D, N]) when C is given,
    else (h [b, D, N, L], last state).
    """
    batch, dim, length = delta.shape
    n = A.shape[1]
    size = max(1, math.isqrt(length))
    chunks = -(-length // size)
    dl, dul, bl = _chunked(delta, chunks, size), _chunked(du, chunks, size), _chunked(Bm, chunks, size)
    A4 = A[None, :, :, None]                                                   # [1, D, N, 1]

    def step(h, j):
        a = torch.exp(dl[j][:, :, None, :] * A4)                               # [b, D, N, chunks]
        return torch.addcmul(a * h, dul[j][:, :, None, :], bl[j][:, None, :, :])

    state = delta.new_zeros(batch, dim, n, chunks)
    if chunks > 1:   # pass 1: chunk-end states from zero, then the true state entering each chunk
        for j in range(size):
            state = step(state, j)
        decay = torch.exp(dl.sum(0)[:, :, None, :] * A4)                      # whole-chunk decay
        carry = torch.zeros_like(state[..., 0])
        incoming = torch.empty_like(state)
        for c in range(chunks):
            incoming[..., c] = carry
            carry = torch.addcmul(state[..., c], decay[..., c], carry)
        state = incoming
    if C is not None:
        cl = _chunked(C, chunks, size)
        y = delta.new_empty(size, batch, dim, chunks)
    else:
        h_all = delta.new_empty(size, batch, dim, n, chunks)
    for j in range(size):   # pass 2: true states, consumed as they are made
        state = step(state, j)
        if C is not None:
            torch.sum(state * cl[j][:, None], dim=2, out=y[j])
        else:
            h_all[j] = state
    last = state[..., -1]   # padding steps keep the state, so this is h at L-1
    if C is not None:
        return y.permute(1, 2, 3, 0).reshape(batch, dim, -1)[..., :length], last
    return h_all.permute(1, 2, 3, 4, 0).reshape(batch, dim, n, -1)[..., :length], last


class _SelectiveScan(torch.autograd.Function):
    """y[b,d,l] = sum_n C[b,n,l] h[b,d,n,l]; delta here is final (bias and softplus applied by the caller)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        with torch.no_grad():
            y, last = fused_scan(delta, delta * u, B, A, C)
        ctx.save_for_backward(u, delta, A, B, C)
        ctx.mark_non_differentiable(last)
        return y, last

    @staticmethod
    def backward(ctx, gy, _glast):
        u, delta, A, B, C = ctx.saved_tensors
        with torch.no_grad():
            du = delta * u
            h, _ = fused_scan(delta, du, B, A)                                   # [b, D, N, L]
            # adjoint, run forwards on the reversed sequence: coefficient at t is a_{t+1}
            delta_next = torch.nn.functional.pad(delta[..., 1:], (0, 1))
            gh, _ = fused_scan(delta_next.flip(-1), gy.flip(-1), C.flip(-1), A)
            gh = gh.flip(-1)
            gC = (h * gy[:, :, None]).sum(1)
            s = (gh * B[:, None]).sum(2)
            gB = (gh * du[:, :, None]).sum(1)
            # d loss / d(delta_t A) = gh_t * a_t h_{t-1} = gh_t * (h_t - du_t B_t): no exp, no shift needed
            h -= du[:, :, None, :] * B[:, None, :, :]
            h *= gh
            del gh
            gdelta = s * u + (h * A[None, :, :, None]).sum(2)
            gA = (h * delta[:, :, None]).sum((0, 3))
            gu = s * delta
        return gu, gdelta, gA, gB, gC


def scan(u, delta, A, B, C):
    """Returns (y [batch, D, L], last state [batch, D, N]) with gradients for u, delta, A, B, C."""
    return _SelectiveScan.apply(u, delta, A, B, C)
