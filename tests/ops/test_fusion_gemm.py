"""The ``gemm`` fusion backend (ops/_fusion_gemm.py: block-Toeplitz bands, batched GEMMs) against ``ref``.

CPU, float64, to 1e-12 relative: the forward and every gradient (input, each kernel, theta; with ASWM also its
1x1 conv's weight and bias), several scale sets, theta 0 and not, grids whose H * W is and is not a multiple of
the padding (16), one frame and frames fewer than the window. bf16 (CPU at 16 channels, GPU
at the bench's 384, marked gpu): within 1e-2 (output) and 2e-2 (each gradient; theta's relative to the sum of its
terms' magnitudes, as it cancels) of float64, with bf16 or fp32 (the model's) kernels.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from msf_scale.models.blocks import StateFusion
from msf_scale.ops import state_fusion, state_fusion_ref
from msf_scale.ops._fusion_gemm import multiscale_fusion_gemm


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


SHAPES = [(2, 3, 4, 5, 6),      # S = 30: padded to 32
          (3, 2, 1, 4, 4),      # one frame (every off-centre frame is padding); S = 16: no padded column
          (1, 4, 2, 7, 3),      # frames fewer than the window
          (1, 2, 3, 2, 1)]      # a grid smaller than every window but 3 x 3


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scales", [(3,), (5,), (3, 5, 7), (7, 3)])
@pytest.mark.parametrize("theta", [0.0, 0.7])
def test_matches_ref_float64(shape, scales, theta):
    h, ks = make(shape, scales)
    th = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    got = state_fusion(h, ks, th, backend="gemm")
    want = state_fusion_ref(h, ks, th)
    for a, b in zip(got, want):
        assert a.shape == b.shape and rel(a, b) < 1e-12
    gouts = [torch.randn_like(b) for b in want]
    ga = torch.autograd.grad(got, [h, *ks, th], gouts)
    gb = torch.autograd.grad(want, [h, *ks, th], gouts)
    for i, (a, b) in enumerate(zip(ga, gb)):
        assert rel(a, b) < 1e-12, f"gradient of input {i}: rel err {rel(a, b):.2e}"


def test_unused_outputs_get_no_gradient():
    """Only F_1 feeds the loss: the other kernels' gradients are zero, h's and theta's those of F_1 alone."""
    h, ks = make((2, 3, 3, 4, 5), (3, 5))
    th = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    f1 = state_fusion(h, ks, th, backend="gemm")[0]
    ga = torch.autograd.grad(f1.square().sum(), [h, *ks, th])
    gb = torch.autograd.grad(state_fusion_ref(h, ks[:1], th)[0].square().sum(), [h, ks[0], th])
    assert rel(ga[0], gb[0]) < 1e-12 and rel(ga[1], gb[1]) < 1e-12 and rel(ga[3], gb[2]) < 1e-12
    assert ga[2].abs().max() == 0


@pytest.mark.parametrize("scales", [(3, 5), (3, 5, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_aswm_matches_ref_float64(scales, bias):
    shape = (2, 4, 3, 5, 6)
    h, ks = make(shape, scales)
    m, c = len(scales), shape[1]
    th = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    aw = (torch.randn(m, m * c, 1, 1, 1, dtype=torch.float64) / c ** 0.5).requires_grad_()
    ab = torch.randn(m, dtype=torch.float64).requires_grad_() if bias else None
    got = multiscale_fusion_gemm(h, ks, th, aw, ab)
    want = aswm_ref(state_fusion_ref(h, ks, th), aw, ab)
    assert rel(got, want) < 1e-12
    inputs = [h, *ks, th, aw] + ([ab] if bias else [])
    gout = torch.randn_like(want)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(got, inputs, gout), torch.autograd.grad(want, inputs, gout))):
        assert rel(a, b) < 1e-12, f"gradient of input {i}: rel err {rel(a, b):.2e}"


def test_state_fusion_module_takes_the_gemm_path():
    """StateFusion(backend="gemm") with ASWM equals the conv backend's module in float64, output and gradients."""
    torch.manual_seed(0)
    mods = [StateFusion(8, (3, 5, 7), 0.7, True, use_aswm=True, backend=b, init="uniform", dtype=torch.float64)
            for b in ("gemm", "conv")]
    mods[1].load_state_dict(mods[0].state_dict())
    x = torch.randn(2, 8, 4, 5, 5, dtype=torch.float64)
    outs = [m(x) for m in mods]
    assert rel(outs[0], outs[1]) < 1e-12
    for o in outs:
        o.square().sum().backward()
    for (name, p0), p1 in zip(mods[0].named_parameters(), mods[1].parameters()):
        assert rel(p0.grad, p1.grad) < 1e-12, name


def _bf16_errors(device, c, kernels_fp32, seed=0):
    """The gemm backend with bf16 states (kernels bf16, or fp32 as the model's parameters are under autocast) against
    float64 from the same rounded inputs: relative errors of (output, dh, each kernel, theta, ASWM weight, bias).
    Theta's gradient, -sum_{m,c} off_{m,c} dL/dw'_{m,c,centre}, cancels (its terms' magnitudes sum to ~100x it), so
    its error is taken relative to that sum: what bf16 rounding of the terms can reach; the others to max |ref|."""
    from msf_scale.ops.state_fusion import cfd_kernel
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
    got = multiscale_fusion_gemm(h, ks, th, aw, ab)
    ga = torch.autograd.grad(got, inputs, gout.to(torch.bfloat16))
    errs = [rel(got, want)] + [rel(a, b) for a, b in zip(ga, gb)]
    errs[5] = abs(ga[4].item() - gb[4].item()) / theta_scale
    return errs


BF16_BOUNDS = [1e-2] + [2e-2] * 7   # output; dh, dk3, dk5, dk7, dtheta (conditioned, see _bf16_errors), dA, db


@pytest.mark.parametrize("kernels_fp32", [False, True])
@pytest.mark.parametrize("seed", [0, 4])
def test_bf16_within_fixed_bounds(kernels_fp32, seed):
    """CPU, 16 channels: bf16 in, the output and every gradient within fixed bounds of float64 (the GEMMs accumulate in
    fp32; one rounding of each output)."""
    errs = _bf16_errors("cpu", 16, kernels_fp32, seed)
    bad = [(i, f"{e:.1e}") for i, (e, b) in enumerate(zip(errs, BF16_BOUNDS)) if e >= b]
    assert not bad, f"(index, rel err) over the bound: {bad}; all: {[f'{e:.1e}' for e in errs]}"


@pytest.mark.gpu
@pytest.mark.parametrize("kernels_fp32", [False, True])
def test_gpu_bf16_within_fixed_bounds(kernels_fp32):
    """CUDA, the bench width (384 channels): as the CPU test; prints the errors."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    errs = _bf16_errors("cuda", 384, kernels_fp32)
    print(f"rel err vs float64 (out, h, k3, k5, k7, theta (conditioned), aswm w, b): {[f'{e:.1e}' for e in errs]}")
    bad = [(i, f"{e:.1e}") for i, (e, b) in enumerate(zip(errs, BF16_BOUNDS)) if e >= b]
    assert not bad, f"(index, rel err) over the bound: {bad}"


def test_compiles_with_fullgraph():
    """The models compile with fullgraph=True; the gemm path (auto's GPU choice for training) must trace whole:
    compiled output and gradients equal eager's."""
    torch.manual_seed(0)
    fusion = StateFusion(8, (3, 5, 7), 0.7, True, use_aswm=True, backend="gemm", init="uniform")
    h = torch.randn(2, 8, 4, 5, 5, requires_grad=True)
    want = fusion(h)
    want_grads = torch.autograd.grad(want.square().sum(), [h, *fusion.parameters()])
    torch._dynamo.reset()
    got = torch.compile(fusion, fullgraph=True)(h)
    got_grads = torch.autograd.grad(got.square().sum(), [h, *fusion.parameters()])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
