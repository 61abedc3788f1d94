"""Cases and measures shared by the fused fusion backends' tests (gemm, igemm): inputs, the ASWM in torch, and the
bf16-against-float64 error of a backend's MCFM + ASWM (output and every gradient)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from msf_scale.ops import state_fusion_ref
from msf_scale.ops._cfd import cfd_kernel


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def make(shape, scales, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    h = torch.randn(shape, generator=g, dtype=torch.float64)
    ks = [torch.randn(c, 1, k, k, k, generator=g, dtype=torch.float64) / k ** 1.5 for k in scales]
    return h.to(device, dtype).requires_grad_(), [w.to(device, dtype).requires_grad_() for w in ks]


def aswm_ref(fused, weight, bias):
    logits = F.conv3d(torch.cat(fused, dim=1), weight, bias)
    alpha = torch.softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=1).to(fused[0].dtype)
    return sum(alpha[:, m:m + 1] * f for m, f in enumerate(fused))


# (N, C, T, H, W) cases for float64 agreement: padding and no padding of S, one frame, frames fewer than the
# window, a grid smaller than every window but 3 x 3
SHAPES = [(2, 3, 4, 5, 6), (3, 2, 1, 4, 4), (1, 4, 2, 7, 3), (1, 2, 3, 2, 1)]

BF16_BOUNDS = [1e-2] + [2e-2] * 7   # output; dh, dk3, dk5, dk7, dtheta (conditioned, see bf16_errors), dA, db


def bf16_errors(fused, device, c, kernels_fp32, seed=0):
    """``fused(h, kernels, theta, aswm_weight, aswm_bias)`` (MCFM + ASWM) with bf16 states (kernels bf16, or fp32 as
    the model's parameters are under autocast) against float64 from the same rounded inputs: relative errors of
    (output, dh, each kernel, theta, ASWM weight, bias). Theta's gradient, -sum_{m,c} off_{m,c} dL/dw'_{m,c,centre},
    cancels (its terms' magnitudes sum to ~100x it), so its error is taken relative to that sum: what bf16 rounding
    of the terms can reach; the others to max |ref|."""
    torch.manual_seed(seed)
    shape, scales = (4, c, 8, 14, 14), (3, 5, 7)
    h, ks = make(shape, scales, dtype=torch.bfloat16, device=device, seed=seed)
    if kernels_fp32:
        ks = [w.detach().float().requires_grad_() for w in ks]
    th = torch.tensor(0.7, device=device, requires_grad=True)
    m = len(scales)
    pdt = torch.float32 if kernels_fp32 else torch.bfloat16
    aw = (torch.randn(m, m * c, 1, 1, 1, device=device) / c ** 0.5).to(pdt).requires_grad_()
    ab = torch.randn(m, device=device).to(pdt).requires_grad_()
    inputs = [h, *ks, th, aw, ab]
    x64 = [x.detach().double().requires_grad_() for x in inputs]
    want = aswm_ref(state_fusion_ref(x64[0], x64[1:4], x64[4]), x64[5], x64[6])
    gout = torch.randn_like(want)
    gb = torch.autograd.grad(want, x64, gout)
    folded = [cfd_kernel(w, x64[4]).detach().requires_grad_() for w in x64[1:4]]
    gf = torch.autograd.grad(aswm_ref(state_fusion_ref(x64[0], folded, 0.0), x64[5], x64[6]), folded, gout)
    theta_scale = 0.0
    for w, g in zip(x64[1:4], gf):
        k = w.shape[-1]
        off = w.sum(dim=(1, 2, 3, 4)) - w[:, 0, k // 2].sum(dim=(1, 2))
        theta_scale += (off * g[:, 0, k // 2, k // 2, k // 2]).abs().sum().item()
    got = fused(h, ks, th, aw, ab)
    ga = torch.autograd.grad(got, inputs, gout.to(torch.bfloat16))
    errs = [rel(got, want)] + [rel(a, b) for a, b in zip(ga, gb)]
    errs[5] = abs(ga[4].item() - gb[4].item()) / theta_scale
    return errs


def over_bounds(errs):
    """(index, rel err) of each error at or over BF16_BOUNDS."""
    return [(i, f"{e:.1e}") for i, (e, b) in enumerate(zip(errs, BF16_BOUNDS)) if e >= b]
