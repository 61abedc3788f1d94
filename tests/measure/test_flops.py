"""fvcore counts of the real models: the named ops' handles, agreement with the models' analytic counts, no
unsupported operator anywhere, every backend counting the same."""
import logging

import pytest
import torch
from torch import nn

from msf_scale import flops
from msf_scale.models import create_model, list_models
from msf_scale.ops import selective_scan, state_fusion

pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")


class ScanOnly(nn.Module):
    def __init__(self, use_d: bool, use_z: bool, backend: str):
        super().__init__()
        self.use_d, self.use_z, self.backend = use_d, use_z, backend

    def forward(self, u, delta, A, B, C, D, z):
        return selective_scan(u, delta, A, B, C, D if self.use_d else None, z if self.use_z else None,
                              delta_softplus=True, backend=self.backend)


def _count(module, *inputs) -> tuple[int, dict]:
    fca = flops.flop_analysis(module, inputs[0])
    fca._inputs = inputs
    with torch.no_grad(), flops.meta_convolution():
        return int(fca.total()), dict(fca.unsupported_ops())


@pytest.mark.parametrize("use_d,use_z", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("backend", ["torch", "ref", "numba"])
def test_scan_handle_is_the_lineage_count(use_d, use_z, backend):
    b, d, n, length = 2, 6, 4, 9
    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(b, d, length, generator=g) for _ in range(3))
    A = -torch.rand(d, n, generator=g)
    B, C = torch.randn(b, n, length, generator=g), torch.randn(b, n, length, generator=g)
    total, unsupported = _count(ScanOnly(use_d, use_z, backend), u, delta, A, B, C, torch.ones(d), z)
    assert unsupported == {}
    assert total == 9 * b * length * d * n + b * d * length * (int(use_d) + int(use_z))


def test_fusion_handle_counts_k_cubed_per_element_and_scale():
    class FusionOnly(nn.Module):
        def forward(self, h, k3, k5):
            return state_fusion(h, [k3, k5], 0.7, backend="shift")
    h = torch.randn(2, 4, 3, 5, 5)
    total, unsupported = _count(FusionOnly(), h, torch.randn(4, 1, 3, 3, 3), torch.randn(4, 1, 5, 5, 5))
    assert unsupported == {}
    assert total == h.numel() * (27 + 125)


@pytest.mark.parametrize("variant", ["videomamba", "msf_mamba", "msf_mamba_plus"])
def test_one_block_matches_the_analytic_count(variant):
    """The analytic count of one block is the difference of the model's own count at depth 2 and depth 1."""
    kw = dict(num_classes=32, num_frames=8, img_size=224, device="meta")
    one_block = (create_model(variant, size="small", depth=2, **kw).flops_per_clip()
                 - create_model(variant, size="small", depth=1, **kw).flops_per_clip())
    model = create_model(variant, size="small", depth=2, **kw)
    fca = flops.flop_analysis(model, torch.zeros(1, 3, 8, 224, 224, device="meta"))
    with torch.no_grad(), flops.meta_convolution():
        counted = fca.by_module()["blocks.1"]
    assert counted == pytest.approx(one_block, rel=0.02), (counted, one_block)


@pytest.mark.parametrize("name", list_models())
def test_every_model_matches_its_analytic_count_with_no_unsupported_op(name, caplog):
    variant, size = name.rsplit("_", 1)
    with caplog.at_level(logging.WARNING):
        report = flops.count_model(flops.build(variant, size), name)
    assert report.unsupported == {}
    assert not [r for r in caplog.records if r.name.startswith("fvcore")], [r.getMessage() for r in caplog.records]
    assert report.flops == pytest.approx(report.analytic, rel=0.02), (report.flops, report.analytic)
    assert report.params == create_model(variant, size=size, num_classes=32, device="meta").num_params()


@pytest.mark.parametrize("variant", ["videomamba", "msf_mamba", "msf_mamba_plus"])
def test_ssm_variants_count_exactly_the_analytic_multiply_adds(variant):
    """Stricter than the 2% above: the gate multiply, the causal-conv taps and ASWM's weighted sum (a few tenths
    of a percent each) must be counted too, as flops_per_clip counts them."""
    report = flops.count_model(flops.build(variant, "tiny", frames=4, img_size=64))
    assert report.flops == report.analytic, report.by_operator


@pytest.mark.parametrize("scan,fusion", [("ref", "ref"), ("torch", "conv"), ("numba", "shift"), ("auto", "auto")])
def test_every_backend_counts_the_same_as_meta(scan, fusion):
    kw = dict(num_classes=8, num_frames=4, img_size=32, depth=2, patch_size=8)
    meta = flops.count_model(create_model("msf_mamba_plus", size="tiny", device="meta", **kw), device="meta")
    cpu = create_model("msf_mamba_plus", size="tiny", scan_backend=scan, fusion_backend=fusion, **kw)
    assert flops.count_model(cpu, device="cpu").flops == meta.flops


def test_traced_model_computes_what_the_eager_model_does():
    """The named ops are not only counted: a traced graph runs them, with the eager path's numbers."""
    torch.manual_seed(0)
    model = create_model("msf_mamba_plus", size="tiny", num_classes=8, num_frames=4, img_size=32, depth=2,
                         patch_size=8, fusion_init="uniform").eval()
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        assert any(n.kind() == "msf_scale::selective_scan" for n in traced.inlined_graph.nodes())
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cfg", [dict(stride=1, padding=1), dict(stride=(1, 2, 2), padding=1),
                                 dict(stride=2, padding=0, dilation=2), dict(stride=(2, 16, 16), padding=0)])
def test_meta_convolution_shape_rule_matches_pytorch_and_is_removed(cfg):
    x, w = torch.zeros(2, 6, 8, 33, 33, device="meta"), torch.zeros(4, 3, 3, 3, 3, device="meta")
    expected = torch.nn.functional.conv3d(x, w, groups=2, **cfg).shape
    class Conv(nn.Module):
        def forward(self, x):
            return torch.nn.functional.conv3d(x, w, groups=2, **cfg)
    with torch.no_grad(), flops.meta_convolution():
        graph, out = torch.jit._get_trace_graph(Conv(), (x,))
    assert out.shape == expected
    assert any(n.kind() == "aten::_convolution" for n in graph.nodes())
    assert torch.nn.functional.conv3d(x, w, groups=2, **cfg).shape == expected
    with pytest.raises(RuntimeError):   # PyTorch's own meta kernel is back: it checks channels, ours does not
        torch.nn.functional.conv3d(x, w, groups=3, **cfg)
