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
