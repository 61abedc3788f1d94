"""Which form the causal conv1d takes (cuDNN or shifted multiply-adds) by device, trace and autograd; the values of
both forms are checked against float64 loops in test_gpu_ops.py (GPU) and through every model test (CPU)."""
from types import SimpleNamespace

import pytest
import torch

from msf_scale.ops import causal_conv1d as cc

ON_GPU, ON_CPU = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)


@pytest.mark.parametrize("form", ["cudnn", "shifted"])
@pytest.mark.parametrize("compiling", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_cudnn_unless_shifted_is_asked_for_compiled_inference(monkeypatch, form, compiling, grad):
    monkeypatch.setattr(cc, "COMPILED_INFERENCE_FORM", form)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    with torch.set_grad_enabled(grad):
        assert cc._cudnn(ON_GPU) == (form == "cudnn" or not compiling or grad)
        assert not cc._cudnn(ON_CPU)


def test_compiled_inference_takes_the_shifted_form_by_default():
    """Without MSF_SCALE_CONV1D_COMPILED the form is "shifted" (measured faster at batch 1, session 16); the variable
    picks cudnn; anything else is refused. (The module reads it once, at import, through this function.)"""
    assert cc.compiled_inference_form({}) == "shifted"
    assert cc.compiled_inference_form({"MSF_SCALE_CONV1D_COMPILED": "cudnn"}) == "cudnn"
    with pytest.raises(ValueError, match="cudnn or shifted"):
        cc.compiled_inference_form({"MSF_SCALE_CONV1D_COMPILED": "fast"})


@pytest.mark.parametrize("form", ["cudnn", "shifted"])
@pytest.mark.parametrize("anticausal", [False, True])
def test_token_major_layout_matches_a_loop(monkeypatch, form, anticausal):
    """``token_major`` ([B, L, E] in and out; the grouped mixer's batch-1 inference layout) against a float64 loop
    over taps, both forms (cuDNN's stands in as CPU F.conv1d here) and both directions, bias and none."""
    monkeypatch.setattr(cc, "_cudnn", lambda x: form == "cudnn")
    torch.manual_seed(0)
    x = torch.randn(2, 9, 5, dtype=torch.float64)     # [B, L, E]
    weight, bias = torch.randn(5, 1, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    op = cc.anticausal_depthwise_conv1d if anticausal else cc.causal_depthwise_conv1d
    want = torch.zeros_like(x)
    for t in range(9):
        for i in range(4):   # causal: output t sees x[t - 3 + i] with tap i; anticausal: x[t + 3 - i]
            src = t + 3 - i if anticausal else t - 3 + i
            if 0 <= src < 9:
                want[:, t] += weight[:, 0, i] * x[:, src]
    for b in (bias, None):
        got = op(x, weight, b, token_major=True)
        assert got.shape == x.shape
        assert torch.allclose(got, want + (0 if b is None else b), rtol=1e-12, atol=1e-12)
        assert torch.allclose(got, op(x.transpose(1, 2).contiguous(), weight, b).transpose(1, 2), rtol=1e-12)


def _torch_both(x, weight, bias):
    """The torch form (checked against loops above through the per-direction functions) on a [2E, 1, K] weight."""
    return cc.conv1d_both_silu_torch(x, weight[:, 0].t(), bias)


@pytest.mark.parametrize("shape", ["1,192,8,14,14", "1,576,8,14,14"])
def test_batch_one_inference_kernels_compile_for_hopper(shape):
    """The token-major conv1d and the fused fusion forward's launches at batch 1 (tiny's and base's widths: the
    stacked and the shared forms, on the padded input (the default) and unpadded), compiled for sm_90 on this machine (benchmarks/kernel_resources.py --inference:
    Triton's ahead-of-time compile and ptxas -v) with no register spills. The interpreter tests run Python that
    Triton's compiler may reject: session 20's conv kernel reassigned a constexpr, passed every CPU test and failed
    every compiled model on the GPU. Compile-time facts."""
    pytest.importorskip("triton")
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "kernel_resources.py"), "--json",
                          "--inference", "--shape", shape], capture_output=True, text=True, env=env, cwd=root,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    form = "stacked" if shape.split(",")[1] == "192" else "shared"
    channels = shape.split(",")[1]
    assert [r["kernel"] for r in rows] == ["conv1d both silu E=384", f"fusion forward ({form}, unpadded input) "
                                           f"C={channels}", f"fusion forward ({form}) C={channels}", "fusion alpha",
                                           "fusion combine", "fusion combine token-major"], rows
    for r in rows:
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, r


@pytest.mark.parametrize("k", [4, 3])
def test_both_directions_kernel_matches_torch_float64(k):
    """The Triton kernel (ops/_conv1d_triton.py, under the interpreter) in float64 against the torch form: x a slice
    of a wider [B, L, 2E] tensor (the input projection's output, as the mixer passes it), L and E not multiples of
    the program's block (masked edges), two batch rows; each direction's half checked on its own."""
    pytest.importorskip("triton")
    from msf_scale.ops._conv1d_triton import CONFIG, conv1d_both_silu
    torch.manual_seed(0)
    length, e = CONFIG["BL"] + 5, CONFIG["BE"] + 3
    xz = torch.randn(2, length, 2 * e, dtype=torch.float64)
    x = xz[..., :e]
    weight, bias = torch.randn(2 * e, 1, k, dtype=torch.float64), torch.randn(2 * e, dtype=torch.float64)
    got, want = conv1d_both_silu(x, weight[:, 0].t().contiguous(), bias), _torch_both(x, weight, bias)
    assert got.shape == (2, length, 2 * e) and got.dtype == torch.float64
    assert torch.allclose(got[..., :e], want[..., :e], rtol=1e-12, atol=1e-12), "forward (causal) half"
    assert torch.allclose(got[..., e:], want[..., e:], rtol=1e-12, atol=1e-12), "backward (anticausal) half"


@pytest.mark.parametrize("form", ["triton", "torch"])
def test_token_major_dispatch_follows_the_form(monkeypatch, form):
    """conv1d_both_silu_token_major launches the kernel where Triton runs and TOKEN_MAJOR_FORM is "triton"
    ($MSF_SCALE_CONV1D_TOKENS), the torch form otherwise; the same values; the variable refuses other names."""
    pytest.importorskip("triton")
    from msf_scale.ops import _conv1d_triton
    monkeypatch.setattr(cc, "TOKEN_MAJOR_FORM", form)
    launched = []
    real = _conv1d_triton.conv1d_both_silu
    monkeypatch.setattr(_conv1d_triton, "conv1d_both_silu", lambda *a: launched.append(1) or real(*a))
    x = torch.randn(1, 7, 5, dtype=torch.float64)
    weight, bias = torch.randn(10, 1, 4, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    got = cc.conv1d_both_silu_token_major(x, weight[:, 0].t(), bias)   # taps [K, 2E] (a view: the op copies it)
    assert launched == ([1] if form == "triton" else [])
    assert torch.allclose(got, _torch_both(x, weight, bias), rtol=1e-12, atol=1e-12)
    assert cc.token_major_form({}) == "triton"
    if form == "triton":   # forward only: a gradient is refused up front, not at backward()
        with pytest.raises(RuntimeError, match="forward-only"):
            cc.conv1d_both_silu_token_major(x.requires_grad_(), weight[:, 0].t(), bias)
    with pytest.raises(ValueError, match="triton or torch"):
        cc.token_major_form({"MSF_SCALE_CONV1D_TOKENS": "cuda"})


@pytest.mark.gpu
@pytest.mark.parametrize("width", [384, 1152])
def test_gpu_both_directions_kernel_bf16_against_float64(width):
    """The kernel on the GPU in bf16 at the mixer's widths (tiny / base d_inner) and the models' length, against the
    torch form in float64 on the same (bf16-rounded) inputs: one rounding of the output, ~bf16's precision."""
    from msf_scale.ops._conv1d_triton import conv1d_both_silu
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run on the lent GPU: pytest -m gpu)")
    torch.manual_seed(0)
    xz = torch.randn(1, 1569, 2 * width, device="cuda", dtype=torch.bfloat16)
    x = xz[..., :width]
    weight, bias = torch.randn(2 * width, 1, 4, device="cuda") * 0.5, torch.randn(2 * width, device="cuda")
    got = conv1d_both_silu(x, weight[:, 0].t().contiguous(), bias).double()
    want = _torch_both(x.double(), weight.double(), bias.double())
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 8e-3, err
