"""Cases and measures shared by the fused fusion backends' tests (gemm, igemm, fft): inputs, the ASWM in torch, and the
bf16-against-float64 error of a backend's MCFM + ASWM (output and every gradient)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from msf_scale.models.blocks import StateFusion
from msf_scale.ops import state_fusion, state_fusion_ref
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
    """StateFusion's ASWM on ``fused``; fp32 weights meet bf16 states in the states' dtype, as under autocast."""
    dtype = fused[0].dtype
    logits = F.conv3d(torch.cat(fused, dim=1), weight.to(dtype), None if bias is None else bias.to(dtype))
    alpha = torch.softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=1).to(fused[0].dtype)
    return sum(alpha[:, m:m + 1] * f for m, f in enumerate(fused))


# (N, C, T, H, W) cases for float64 agreement: padding and no padding of S, one frame, frames fewer than the
# window, a grid smaller than every window but 3 x 3
SHAPES = [(2, 3, 4, 5, 6), (3, 2, 1, 4, 4), (1, 4, 2, 7, 3), (1, 2, 3, 2, 1)]

def check_matches_ref(backend, shape, scales, theta, seed=0):
    """state_fusion(backend) against ``ref`` in float64 to 1e-12 relative: every output and every gradient (h, each
    kernel, theta; each non-zero in the reference unless theta is 0)."""
    h, ks = make(shape, scales, seed=seed)
    th = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    got = state_fusion(h, ks, th, backend=backend)
    want = state_fusion_ref(h, ks, th)
    for a, b in zip(got, want):
        assert a.shape == b.shape and rel(a, b) < 1e-12, f"output: rel err {rel(a, b):.2e}"
    g = torch.Generator().manual_seed(seed + 1)   # not the global RNG: its state depends on which tests ran before
    gouts = [torch.randn(b.shape, generator=g, dtype=b.dtype) for b in want]
    ga = torch.autograd.grad(got, [h, *ks, th], gouts)
    gb = torch.autograd.grad(want, [h, *ks, th], gouts)
    for i, (a, b) in enumerate(zip(ga, gb)):
        assert b.abs().max() > 0 or theta == 0.0
        assert rel(a, b) < 1e-12, f"gradient of input {i}: rel err {rel(a, b):.2e}"


def check_unused_outputs_get_no_gradient(backend):
    """Only F_1 feeds the loss: the other kernel's gradient is zero, h's and theta's those of F_1 alone."""
    h, ks = make((2, 3, 3, 4, 5), (3, 5))
    th = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    f1 = state_fusion(h, ks, th, backend=backend)[0]
    ga = torch.autograd.grad(f1.square().sum(), [h, *ks, th])
    gb = torch.autograd.grad(state_fusion_ref(h, ks[:1], th)[0].square().sum(), [h, ks[0], th])
    assert rel(ga[0], gb[0]) < 1e-12 and rel(ga[1], gb[1]) < 1e-12 and rel(ga[3], gb[2]) < 1e-12
    assert ga[2].abs().max() == 0


def check_module_matches_conv(backend, channels):
    """StateFusion(backend) with ASWM equals the conv backend's module in float64, output and every gradient."""
    torch.manual_seed(0)
    mods = [StateFusion(channels, (3, 5, 7), 0.7, True, use_aswm=True, backend=b, init="uniform",
                        dtype=torch.float64) for b in (backend, "conv")]
    mods[1].load_state_dict(mods[0].state_dict())
    x = torch.randn(2, channels, 4, 5, 5, dtype=torch.float64)
    outs = [m(x) for m in mods]
    assert rel(outs[0], outs[1]) < 1e-12
    for o in outs:
        o.square().sum().backward()
    for (name, p0), p1 in zip(mods[0].named_parameters(), mods[1].parameters()):
        assert rel(p0.grad, p1.grad) < 1e-12, name


def check_compiled_matches_eager(backend, channels, scales, dtype=torch.float32, compile_backend="inductor",
                                 out_tol=(1e-5, 1e-5), grad_tol=(1e-4, 1e-4)):
    """StateFusion(backend) with ASWM under torch.compile(fullgraph=True): output and every gradient equal eager's
    within (rtol, atol)."""
    torch.manual_seed(0)
    fusion = StateFusion(channels, scales, 0.7, True, use_aswm=True, backend=backend, init="uniform", dtype=dtype)
    h = torch.randn(2, channels, 3 if dtype == torch.float64 else 4, 5, 5, dtype=dtype, requires_grad=True)
    want = fusion(h)
    want_grads = torch.autograd.grad(want.square().sum(), [h, *fusion.parameters()])
    torch._dynamo.reset()
    got = torch.compile(fusion, fullgraph=True, backend=compile_backend)(h)
    got_grads = torch.autograd.grad(got.square().sum(), [h, *fusion.parameters()])
    torch.testing.assert_close(got, want, rtol=out_tol[0], atol=out_tol[1])
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=grad_tol[0], atol=grad_tol[1])


BF16_BOUNDS = [1e-2] + [2e-2] * 7   # output; dh, dk3, dk5, dk7, dtheta (conditioned, see bf16_errors), dA, db


def theta_term_scale(h64, ks64, th64, gouts, combine=None) -> float:
    """sum_{m,c} |off_{m,c} dL/dw'_{m,c,centre}| in float64: the magnitudes of the terms theta's gradient
    -sum_{m,c} off_{m,c} dL/dw'_{m,c,centre} adds up. They cancel (~100x), so a low-precision backend's theta error
    is measured against this sum, what rounding the terms can reach, not against the small result. ``combine``: the
    fused outputs -> what gouts is the gradient of (the ASWM), default the list itself."""
    folded = [cfd_kernel(w, th64).detach().requires_grad_() for w in ks64]
    outs = state_fusion_ref(h64, folded, 0.0)
    gf = torch.autograd.grad(combine(outs) if combine else outs, folded, gouts)
    total = 0.0
    for w, g in zip(ks64, gf):
        k = w.shape[-1]
        off = w.sum(dim=(1, 2, 3, 4)) - w[:, 0, k // 2].sum(dim=(1, 2))
        total += (off * g[:, 0, k // 2, k // 2, k // 2]).abs().sum().item()
    return total


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
    theta_scale = theta_term_scale(x64[0], x64[1:4], x64[4], gout, lambda fs: aswm_ref(fs, x64[5], x64[6]))
    got = fused(h, ks, th, aw, ab)
    ga = torch.autograd.grad(got, inputs, gout.to(torch.bfloat16))
    errs = [rel(got, want)] + [rel(a, b) for a, b in zip(ga, gb)]
    errs[5] = abs(ga[4].item() - gb[4].item()) / theta_scale
    return errs


def over_bounds(errs):
    """(index, rel err) of each error at or over BF16_BOUNDS."""
    return [(i, f"{e:.1e}") for i, (e, b) in enumerate(zip(errs, BF16_BOUNDS)) if e >= b]


def check_bf16_within_bounds(fused, device, c, kernels_fp32, seed=0, label=None):
    """bf16_errors of ``fused`` within BF16_BOUNDS; with ``label`` the errors are printed (GPU runs keep them)."""
    errs = bf16_errors(fused, device, c, kernels_fp32, seed)
    if label:
        print(f"{label} rel err vs float64 (out, h, k3, k5, k7, theta (conditioned), aswm w, b): "
              f"{[f'{e:.1e}' for e in errs]}")
    bad = over_bounds(errs)
    assert not bad, f"(index, rel err) over the bound: {bad}; all: {[f'{e:.1e}' for e in errs]}"


def check_aswm_matches_ref(fused, scales, bias):
    """``fused(h, kernels, theta, aswm_weight, aswm_bias)`` (MCFM + ASWM) against ref + the ASWM in torch, float64 to
    1e-12 relative: the output and every gradient (each non-zero in the reference)."""
    shape = (2, 4, 3, 5, 6)
    h, ks = make(shape, scales)
    m, c = len(scales), shape[1]
    th = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    aw = (torch.randn(m, m * c, 1, 1, 1, generator=g, dtype=torch.float64) / c ** 0.5).requires_grad_()
    ab = torch.randn(m, generator=g, dtype=torch.float64).requires_grad_() if bias else None
    got = fused(h, ks, th, aw, ab)
    want = aswm_ref(state_fusion_ref(h, ks, th), aw, ab)
    assert rel(got, want) < 1e-12
    inputs = [h, *ks, th, aw] + ([ab] if bias else [])
    gout = torch.randn(want.shape, generator=g, dtype=want.dtype)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(got, inputs, gout), torch.autograd.grad(want, inputs, gout))):
        assert b.abs().max() > 0
        assert rel(a, b) < 1e-12, f"gradient of input {i}: rel err {rel(a, b):.2e}"
