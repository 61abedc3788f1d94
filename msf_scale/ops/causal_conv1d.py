"""Mamba's causal depthwise conv1d, with a CPU backend: the op before each direction's scan.

x [B, E, L], weight [E, 1, K], bias [E] -> [B, E, L], where output t sees inputs t-K+1..t (zero-padded on the
left). ``anticausal_depthwise_conv1d`` is the same conv run backwards in time (output t sees t..t+K-1), without
flipped copies: what the bidirectional mixer's backward direction needs when its scan also runs backwards. On GPU
cuDNN's depthwise conv1d; on CPU the same result as K shifted multiply-adds, because PyTorch's CPU depthwise conv1d
backward was ~20% of a CPU training step. Where torch.compile traces a forward without autograd (inference) on GPU
the shifted form is taken too (``MSF_SCALE_CONV1D_COMPILED``, read at import: ``shifted``, the default, or
``cudnn``): Inductor fuses the K multiply-adds with what surrounds them (the transposed read of the input
projection, both directions' concatenation, the silu after), where cuDNN's conv is an opaque call per direction
(PyTorch's generic depthwise kernel, 20.6 us a call at base's width). Measured at batch 1, compiled, on the lent H100
(session 16): msf_mamba tiny 2.55 -> 2.22 ms, videomamba base 6.41 -> 5.44, msf_mamba_plus tiny 4.41 -> 4.11.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from msf_scale.ops._choice import env_choice

def compiled_inference_form(environ=os.environ) -> str:
    """$MSF_SCALE_CONV1D_COMPILED: "shifted" (the default) or "cudnn"."""
    return env_choice("MSF_SCALE_CONV1D_COMPILED", ("cudnn", "shifted"), "shifted", environ)


COMPILED_INFERENCE_FORM = compiled_inference_form()


def token_major_form(environ=os.environ) -> str:
    """$MSF_SCALE_CONV1D_TOKENS: "triton" (the default) or "torch": conv1d_both_silu_token_major's form."""
    return env_choice("MSF_SCALE_CONV1D_TOKENS", ("triton", "torch"), "triton", environ)


TOKEN_MAJOR_FORM = token_major_form()


def _cudnn(x: torch.Tensor) -> bool:
    """cuDNN's conv on CUDA, except in a compiled forward without autograd (the shifted form, unless the environment
    asks for cudnn)."""
    return x.is_cuda and not (COMPILED_INFERENCE_FORM == "shifted" and torch.compiler.is_compiling()
                              and not torch.is_grad_enabled())


def causal_depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            token_major: bool = False) -> torch.Tensor:
    """token_major: x and the result are [B, L, E] (channels innermost) instead of [B, E, L]."""
    k = weight.shape[-1]
    if _cudnn(x):
        if token_major:
            return causal_depthwise_conv1d(x.transpose(1, 2), weight, bias).transpose(1, 2)
        return F.conv1d(x, weight, bias, padding=k - 1, groups=x.shape[1])[..., :x.shape[-1]]
    return _shifted(x, weight, bias, token_major=token_major)


def anticausal_depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                token_major: bool = False) -> torch.Tensor:
    """causal_depthwise_conv1d(x.flip(-1), weight, bias).flip(-1): output t = bias + sum_k w[k] x[t + K - 1 - k]."""
    k = weight.shape[-1]
    if _cudnn(x):
        if token_major:
            return anticausal_depthwise_conv1d(x.transpose(1, 2), weight, bias).transpose(1, 2)
        return F.conv1d(x, weight.flip(-1), bias, padding=k - 1, groups=x.shape[1])[..., k - 1:]
    return _shifted(x, weight, bias, anticausal=True, token_major=token_major)


def _shifted(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, anticausal: bool = False,
             token_major: bool = False) -> torch.Tensor:
    """The CPU (and compiled inference) form: sum over taps i of w[:, i] * x shifted right by K-1-i (anticausal:
    left by K-1-i), along the last axis, or along axis 1 with ``token_major`` ([B, L, E]: the taps broadcast over
    the channels, the innermost axis)."""
    k = weight.shape[-1]
    length = x.shape[1] if token_major else x.shape[-1]
    pad = (0, k - 1) if anticausal else (k - 1, 0)
    xp = F.pad(x, (0, 0, *pad) if token_major else pad)
    w = weight[:, 0, :].to(x.dtype)   # [E, K]
    start = (lambda i: k - 1 - i) if anticausal else (lambda i: i)

    def tap(i):   # (the shifted input, tap i's weights shaped to broadcast against it)
        s = start(i)
        return (xp[:, s:s + length], w[:, i]) if token_major else (xp[..., s:s + length], w[:, i, None])
    out = torch.mul(*tap(0))
    for i in range(1, k):
        out = torch.addcmul(out, *tap(i))
    if bias is None:
        return out
    return out + (bias.to(x.dtype) if token_major else bias.to(x.dtype)[:, None])


def conv1d_both_silu_token_major(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The grouped mixer's token-major inference step: x [B, L, E] -> [B, L, 2E], silu of the causal conv with taps'
    columns [0, E) | silu of the anticausal one with [E, 2E) (taps [K, 2E]: a conv1d weight [2E, 1, K] tap-major, as
    the kernel reads it; bias [2E]). Where Triton runs (CUDA, or TRITON_INTERPRET=1) and TOKEN_MAJOR_FORM is "triton":
    one kernel (ops/_conv1d_triton.py; compiled, Inductor made two of the torch form); otherwise the two convs, the
    concatenation and the silu in torch."""
    if TOKEN_MAJOR_FORM == "triton" and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        try:
            from msf_scale.ops._conv1d_triton import conv1d_both_silu
        except ImportError:   # no triton: the torch form
            pass
        else:
            return conv1d_both_silu(x, taps, bias)
    return conv1d_both_silu_torch(x, taps, bias)


def conv1d_both_silu_torch(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """conv1d_both_silu_token_major's torch form (any device, autograd): the two token-major convs, concatenated,
    silu."""
    e, weight = x.shape[-1], taps.t().unsqueeze(1)                        # [2E, 1, K]
    return F.silu(torch.cat([causal_depthwise_conv1d(x, weight[:e], bias[:e], token_major=True),
                             anticausal_depthwise_conv1d(x, weight[e:], bias[e:], token_major=True)], dim=-1))
