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
