"""Both directions' depthwise conv1d and the silu after it, token-major, in one Triton pass: the grouped mixer's
batch-1 inference path (models.blocks.BiMamba._forward_token_major).

    out[b, t, e]     = silu(bias[e]     + sum_i w[i, e]     x[b, t - K + 1 + i, e])    causal (forward direction)
    out[b, t, E + e] = silu(bias[E + e] + sum_i w[i, E + e] x[b, t + K - 1 - i, e])    anticausal (backward one)

x [B, L, E] (any row stride: a slice of the input projection's [B, L, 2E] output), w [K, 2E] tap-major (a thread's
channels of one tap are contiguous: vector loads; channel-major taps compiled to 64 scalar loads a thread at the
default block, PTX for sm_90), bias [2E] -> out [B, L, 2E], zero padding outside the sequence. Why: compiled,
Inductor ran this as two kernels (one direction to a buffer, then the other, the concatenation and the silu: 12.8 us a
block at base's width on the lent H100, session 20) for what is one read of x and one write of out. Each program: BL
positions x BE channels, the 2K - 1 row-shifted [BL, BE] tiles loaded once each (from L1/L2 after the first),
accumulation in fp32 (fp64 for fp64 inputs), one rounding to the input dtype. Forward only. Runs on CUDA, or on CPU
tensors under ``TRITON_INTERPRET=1`` (how the tests run it). Under torch.compile it is one opaque custom op
(``msf_scale::conv1d_both_silu``).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

# Launch settings: positions (BL) and channels (BE) a program, warps a program. Untuned: session 20's profiles had the
# kernel at 12.4 us a block at base's width and 5.8 at tiny's, ~4x and ~5x what its bytes need (before the taps went
# tap-major); benchmarks/bench_conv1d_tokens.py --points times alternatives by setting these.
CONFIG = {"BL": 32, "BE": 64, "warps": 4}


@triton.jit
def _shifted(X, row, t, e, em, L, sx_l, ACC: tl.constexpr):
    """x[b, t, e] as [BL, BE] in ACC (row: batch row b's offset), zero where t is outside the sequence."""
    m = ((t >= 0) & (t < L))[:, None] & em[None, :]
    return tl.load(X + row + t[:, None] * sx_l + e[None, :], mask=m, other=0.0).to(ACC)


@triton.jit
def _conv_both(X, W, BIAS, OUT, L, E, sx_b, sx_l, so_b, so_l, K: tl.constexpr, BL: tl.constexpr,
               BE: tl.constexpr, ACC: tl.constexpr):
    """Program = (block of BL positions, block of BE channels, batch row): both directions' outputs there. The
    2K - 1 row-shifted tiles x[t + o], o = -(K - 1) .. K - 1, are each loaded once: o <= 0 feeds the causal sum (tap
    K - 1 + o), o >= 0 the anticausal one (tap K - 1 - o), o = 0 both. Batch offsets in int64."""
    t = tl.program_id(0) * BL + tl.arange(0, BL)
    e = tl.program_id(1) * BE + tl.arange(0, BE)
    b = tl.program_id(2).to(tl.int64)
    em = e < E
    fwd = tl.zeros([BL, BE], dtype=ACC) + tl.load(BIAS + e, mask=em, other=0.0).to(ACC)[None, :]
    bwd = tl.zeros([BL, BE], dtype=ACC) + tl.load(BIAS + E + e, mask=em, other=0.0).to(ACC)[None, :]
    for j in tl.static_range(2 * K - 1):
        o = j - (K - 1)   # a constexpr (static_range unrolls); annotating it fails to compile: reassigned per step
        x = _shifted(X, b * sx_b, t + o, e, em, L, sx_l, ACC)
        if o <= 0:
            fwd += x * tl.load(W + (K - 1 + o) * 2 * E + e, mask=em, other=0.0).to(ACC)[None, :]
        if o >= 0:
            bwd += x * tl.load(W + (K - 1 - o) * 2 * E + E + e, mask=em, other=0.0).to(ACC)[None, :]
    m = (t < L)[:, None] & em[None, :]
    out = OUT + b * so_b + t[:, None] * so_l + e[None, :]
    tl.store(out, (fwd / (1.0 + tl.exp(-fwd))).to(OUT.dtype.element_ty), mask=m)
    tl.store(out + E, (bwd / (1.0 + tl.exp(-bwd))).to(OUT.dtype.element_ty), mask=m)


# Inductor must hand the op the strides it was traced with (x's unit channel stride): the default constraint of recent
# torch, asked for explicitly where the tag exists
EXACT_STRIDES = tuple(t for t in (getattr(torch.Tag, "needs_exact_strides", None),) if t is not None)


def conv1d_both_silu(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [B, L, E] (channels at unit stride), taps [K, 2E] (tap-major: a conv1d weight [2E, 1, K]'s
    ``[:, 0, :].t()``), bias [2E] -> [B, L, 2E] in x's dtype: silu of the causal conv (channels [0, E), taps' columns
    [0, E)) | silu of the anticausal one ([E, 2E)). Forward only (inference): refuses inputs that need a gradient."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, taps, bias)):
        raise RuntimeError("conv1d_both_silu is forward-only (inference); with gradients use the torch form "
                           "(MSF_SCALE_CONV1D_TOKENS=torch) or the channel-major mixer")
    return torch.ops.msf_scale.conv1d_both_silu(x, taps, bias)


@torch.library.custom_op("msf_scale::conv1d_both_silu", mutates_args=(), tags=EXACT_STRIDES)
def _conv1d_both_silu(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The launch as one op: torch.compile traces a model through it without a graph break."""
    batch, length, width = x.shape
    if x.stride(-1) != 1:
        raise ValueError(f"conv1d_both_silu needs channels at unit stride, got strides {x.stride()}")
    if taps.dim() != 2 or taps.shape[1] != 2 * width:
        raise ValueError(f"conv1d_both_silu needs taps [K, 2E] = [K, {2 * width}], got {tuple(taps.shape)}")
    w = taps.contiguous()
    out = x.new_empty(batch, length, 2 * width)
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    bl, be = CONFIG["BL"], CONFIG["BE"]
    grid = (triton.cdiv(length, bl), triton.cdiv(width, be), batch)
    with torch.cuda.device(x.device) if x.device.type == "cuda" else nullcontext():
        _conv_both[grid](x, w, bias.contiguous(), out, length, width, x.stride(0), x.stride(1), out.stride(0),
                         out.stride(1), K=w.shape[0], BL=bl, BE=be, ACC=acc, num_warps=CONFIG["warps"])
    return out


@_conv1d_both_silu.register_fake
def _(x, taps, bias):
    return x.new_empty(x.shape[0], x.shape[1], 2 * x.shape[2])
