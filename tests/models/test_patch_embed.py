"""The tubelet patch embedding (models/stem.py PatchEmbed): a Conv3d whose stride is its kernel, and its GEMM form
for compiled CUDA inference (MSF_SCALE_PATCH_EMBED_COMPILED=gemm, the default): the same values as the conv in
float64, taken only in a compiled CUDA forward without autograd (and never with the form set to conv), and the model's
parameters and state_dict keys unchanged."""
import pytest
import torch
import torch.nn.functional as F

from msf_scale.models import stem


@pytest.mark.parametrize("shape, kernel", [((2, 3, 8, 32, 32), (1, 16, 16)), ((1, 6, 5, 18, 21), (2, 4, 8)),
                                           ((1, 3, 4, 16, 16), (1, 16, 16))])
def test_patchify_linear_is_the_strided_conv_float64(shape, kernel):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    w = torch.randn(7, shape[1], *kernel, generator=g, dtype=torch.float64)
    b = torch.randn(7, generator=g, dtype=torch.float64)
    want = F.conv3d(x, w, b, stride=kernel)                      # remainders (5 frames / 2, 18 / 4, 21 / 8) dropped
    got = stem.patchify_linear(x, w, b, kernel)
    assert got.shape == want.shape
    assert (got - want).abs().max() / want.abs().max() < 1e-13
    assert (stem.patchify_linear(x, w, None, kernel) - F.conv3d(x, w, None, stride=kernel)).abs().max() < 1e-12


def test_gemm_form_only_when_asked_for_in_compiled_cuda_inference(monkeypatch):
    embed = stem.PatchEmbed(3, 8, (1, 4, 4))
    cuda, cpu = type("T", (), {"is_cuda": True})(), type("T", (), {"is_cuda": False})()
    compiling = {"on": True}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling["on"])
    monkeypatch.setattr(stem, "PATCH_EMBED_COMPILED_FORM", "gemm")
    with torch.no_grad():
        assert embed.gemm_form(cuda) and not embed.gemm_form(cpu)
        compiling["on"] = False
        assert not embed.gemm_form(cuda)
        compiling["on"] = True
    assert not embed.gemm_form(cuda)                             # autograd on
    monkeypatch.setattr(stem, "PATCH_EMBED_COMPILED_FORM", "conv")
    with torch.no_grad():
        assert not embed.gemm_form(cuda)


def test_forward_takes_the_gemm_form_when_it_applies(monkeypatch):
    """Forced on CPU: the module's forward runs patchify_linear and matches the conv, eager and compiled."""
    torch.manual_seed(0)
    embed = stem.PatchEmbed(3, 8, (1, 4, 4)).double()
    x = torch.randn(1, 3, 2, 8, 12, dtype=torch.float64)
    with torch.no_grad():
        want = embed(x)
        calls = []
        monkeypatch.setattr(embed, "gemm_form", lambda x: True)
        real = stem.patchify_linear
        monkeypatch.setattr(stem, "patchify_linear", lambda *a: calls.append(1) or real(*a))
        got = embed(x)
        torch._dynamo.reset()
        compiled = torch.compile(embed, fullgraph=True, backend="eager")(x)
    assert calls and (got - want).abs().max() < 1e-12 and (compiled - want).abs().max() < 1e-12


def test_the_model_keeps_its_conv_parameters():
    from msf_scale.models import create_model
    model = create_model("videomamba", size="tiny", num_classes=4, num_frames=2, img_size=32)
    assert isinstance(model.patch_embed, torch.nn.Conv3d)
    assert model.patch_embed.stride == model.patch_embed.kernel_size == (1, 16, 16)
    assert {"patch_embed.weight", "patch_embed.bias"} <= set(model.state_dict())


def test_environment_variable_is_read_and_checked():
    assert stem.patch_embed_compiled_form({}) == "gemm"   # the default since session 17 (measured 3.1-3.6% faster)
    assert stem.patch_embed_compiled_form({"MSF_SCALE_PATCH_EMBED_COMPILED": "gemm"}) == "gemm"
    assert stem.patch_embed_compiled_form({"MSF_SCALE_PATCH_EMBED_COMPILED": "conv"}) == "conv"
    with pytest.raises(ValueError, match="conv or gemm"):
        stem.patch_embed_compiled_form({"MSF_SCALE_PATCH_EMBED_COMPILED": "fast"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the lent GPU: pytest -m gpu)")
def test_gpu_compiled_inference_runs_the_gemm_form(monkeypatch):
    """On CUDA under torch.compile without autograd (bf16 autocast, the latency harness's setting), with the form set
    to gemm: patchify_linear runs and agrees with the eager cuDNN conv."""
    monkeypatch.setattr(stem, "PATCH_EMBED_COMPILED_FORM", "gemm")
    torch.manual_seed(0)
    embed = stem.PatchEmbed(3, 192, (1, 16, 16)).cuda().eval()
    x = torch.randn(1, 3, 8, 224, 224, device="cuda")
    calls = []
    real = stem.patchify_linear
    monkeypatch.setattr(stem, "patchify_linear", lambda *a: calls.append(1) or real(*a))
    torch._dynamo.reset()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        got = torch.compile(embed, fullgraph=True)(x)
        want = F.conv3d(x, embed.weight, embed.bias, stride=(1, 16, 16))
    assert calls, "the compiled forward did not take the gemm form"
    assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() < 2e-2
