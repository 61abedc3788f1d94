"""Every GPU code path of the ops against float64 on the CPU: mamba-ssm's kernel and the torch scan on CUDA,
the fusion's conv backend (cuDNN's depthwise conv3d), and the cuDNN branch of the causal conv1d op.
Marked gpu: skipped on a CPU-only machine; on a CUDA machine a missing mamba-ssm fails (conftest)."""
from __future__ import annotations

import importlib

import pytest
import torch
from test_selective_scan import make_inputs, rel
from test_state_fusion import naive_cfd

from msf_scale.ops import causal_depthwise_conv1d, selective_scan, selective_scan_ref, state_fusion
from msf_scale.ops import scan as scan_mod

fusion_mod = importlib.import_module("msf_scale.ops.state_fusion")
pytestmark = pytest.mark.gpu
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


@pytest.fixture(autouse=True)
def no_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def test_auto_picks_the_gpu_paths(mamba_ssm_kernel):
    cuda = torch.device("cuda")
    assert "cuda" in scan_mod.available_backends()
    assert scan_mod.resolve_backend("auto", cuda, batch=1) == "cuda"
    assert fusion_mod.resolve_backend("auto", cuda, 3, rows=256, grid=196) == "gemm"


def _scan_vs_float64(backend, dtype, length, tol, grad_tol):
    x = make_inputs(2, 64, 16, length, dtype, device="cuda")
    # model parameters stay fp32 (mamba-ssm needs A in fp32), except in a float64 run: a float32 A caps its
    # gradient's error at fp32 rounding (measured on the H200: 3.7e-8 against the 1e-10 bound)
    for k in ("A", "D", "delta_bias"):
        x[k] = x[k].detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    out = selective_scan(*(x[k] for k in NAMES), delta_softplus=True, backend=backend)
    ref_in = {k: v.detach().cpu().double().requires_grad_() for k, v in x.items()}
    ref = selective_scan_ref(*(ref_in[k] for k in NAMES), delta_softplus=True)
    assert out.dtype == dtype and rel(out.cpu(), ref) < tol, f"output rel err {rel(out.cpu(), ref):.2e}"
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, [x[k] for k in NAMES], g.to("cuda", dtype))
    ref_grads = torch.autograd.grad(ref, [ref_in[k] for k in NAMES], g)
    for name, got, want in zip(NAMES, grads, ref_grads):
        assert rel(got.cpu(), want) < grad_tol, f"grad {name}: rel err {rel(got.cpu(), want):.2e}"


@pytest.mark.parametrize("length", [7, 1569])
def test_torch_scan_on_cuda_matches_float64(length):
    _scan_vs_float64("torch", torch.float32, length, 1e-5, 1e-4)
    _scan_vs_float64("torch", torch.float64, length, 1e-12, 1e-10)


@pytest.mark.parametrize("length", [7, 1569])
def test_cuda_kernel_matches_float64(length, mamba_ssm_kernel):
    _scan_vs_float64("cuda", torch.float32, length, 1e-3, 5e-3)   # the bounds of the kernel-vs-torch test


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fusion_conv_on_cuda_matches_the_equation(dtype, tol):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, 4, 6, 7, generator=g, dtype=torch.float64)
    kernels = [torch.randn(5, 1, k, k, k, generator=g, dtype=torch.float64) for k in (3, 5, 7)]
    theta = torch.tensor(0.7, dtype=torch.float64)
    hc = h.to("cuda", dtype).requires_grad_()
    kc = [w.to("cuda", dtype).requires_grad_() for w in kernels]
    tc = theta.to("cuda", dtype).requires_grad_()
    got = state_fusion(hc, kc, tc, backend="conv")
    gout = [torch.randn(h.shape, generator=g, dtype=torch.float64) for _ in kernels]
    grads = torch.autograd.grad(got, [hc, *kc, tc], [o.to("cuda", dtype) for o in gout])
    href = h.clone().requires_grad_()
    kref = [w.clone().requires_grad_() for w in kernels]
    tref = theta.clone().requires_grad_()
    want = [naive_cfd(href, w, tref) for w in kref]
    ref_grads = torch.autograd.grad(want, [href, *kref, tref], gout)
    for f, w in zip(got, want):
        assert rel(f.detach().cpu(), w.detach()) < tol
    for a, b in zip(grads, ref_grads):
        assert rel(a.cpu(), b) < 10 * tol


def _causal_conv_loop(x, w, b):
    """y_t = b + sum_j w_j x_{t-(K-1)+j}, zero before the start."""
    k, length = w.shape[-1], x.shape[-1]
    y = b.view(1, -1, 1).expand(x.shape[0], -1, length).clone()
    for t in range(length):
        for j in range(k):
            if t - (k - 1) + j >= 0:
                y[:, :, t] = y[:, :, t] + w[:, 0, j] * x[:, :, t - (k - 1) + j]
    return y


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_causal_conv1d_branches_match_float64(device):
    """The cuDNN branch (GPU) and the shifted multiply-adds (CPU) of the model's causal conv."""
    g = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 6, 11), (6, 1, 4), (6,)))
    xs = [t.to(device, torch.float32).requires_grad_() for t in (x, w, b)]
    out = causal_depthwise_conv1d(*xs)
    ref_in = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = _causal_conv_loop(*ref_in)
    assert rel(out.detach().cpu(), ref.detach()) < 1e-6
    gout = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for a, r in zip(torch.autograd.grad(out, xs, gout.to(device, torch.float32)), torch.autograd.grad(ref, ref_in, gout)):
        assert rel(a.cpu(), r) < 1e-5


@pytest.mark.parametrize("form", ["cudnn", "shifted"])
def test_compiled_inference_conv1d_form(monkeypatch, form):
    """MSF_SCALE_CONV1D_COMPILED=shifted: under torch.compile without autograd the causal and anticausal convs are the
    shifted multiply-adds (no cuDNN call in the graph); with autograd, or with cudnn asked for, cuDNN. Both agree with
    eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from msf_scale.ops import causal_conv1d as cc

    monkeypatch.setattr(cc, "COMPILED_INFERENCE_FORM", form)
    g = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(*s, generator=g).cuda() for s in ((2, 6, 11), (6, 1, 4), (6,)))

    def both(x):
        return torch.cat([cc.causal_depthwise_conv1d(x, w, b), cc.anticausal_depthwise_conv1d(x, w, b)], dim=1)

    for grad in (False, True):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("eager")
        with torch.set_grad_enabled(grad):
            got, want = torch.compile(both, fullgraph=True, backend=counter)(x), both(x)
        ops = [str(n.target) for gm in counter.graphs for n in gm.graph.nodes if n.op == "call_function"]
        assert any("conv1d" in op for op in ops) == (grad or form == "cudnn"), ops
        assert rel(got, want) < 1e-6
