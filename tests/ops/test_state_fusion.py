"""CFD state fusion against a direct transcription of SPEC.md's equation, and ASWM's weights."""
import re

import pytest
import torch
import torch.nn.functional as F

from msf_scale.models.blocks import StateFusion
from msf_scale.ops import state_fusion


def naive_cfd(h, w, theta):
    """F(p0) = sum_{p in W} w(p) H(p0+p) - theta H(p0) sum_{p in W, p_t != 0} w(p), zero outside the grid:
    a loop over window offsets, no convolution."""
    k = w.shape[-1]
    r = k // 2
    hp = F.pad(h, (r, r, r, r, r, r))
    _, _, t, hh, ww = h.shape
    out = torch.zeros_like(h)
    off_centre = torch.zeros(h.shape[1], dtype=h.dtype)
    for dt in range(-r, r + 1):
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                tap = w[:, 0, dt + r, dy + r, dx + r]
                shifted = hp[:, :, r + dt:r + dt + t, r + dy:r + dy + hh, r + dx:r + dx + ww]
                out += tap.view(1, -1, 1, 1, 1) * shifted
                if dt != 0:
                    off_centre += tap
    return out - theta * h * off_centre.view(1, -1, 1, 1, 1)


@pytest.mark.parametrize("backend", ["conv", "shift", "ref"])
@pytest.mark.parametrize("theta", [0.0, 0.7, 1.0])
def test_matches_naive_equation(backend, theta):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 5, 4, 6, 7, generator=g, dtype=torch.float64)
    kernels = [torch.randn(5, 1, k, k, k, generator=g, dtype=torch.float64) for k in (3, 5, 7)]
    got = state_fusion(h, kernels, theta, backend=backend)
    for k, w, f in zip((3, 5, 7), kernels, got):
        want = naive_cfd(h, w, theta)
        assert torch.allclose(f, want, atol=1e-12, rtol=1e-12), f"k={k}: max diff {(f - want).abs().max():.2e}"


def test_cfd_cancels_static_states():
    """theta = 1: where the states are the same in every frame (here: constant), the off-centre frames cancel
    and only the centre frame's taps remain, so what the time taps add is change. With theta = 0 they add it back."""
    g = torch.Generator().manual_seed(2)
    value = torch.randn(1, 3, 1, 1, 1, generator=g, dtype=torch.float64)
    h = value.expand(1, 3, 5, 7, 7).contiguous()
    w = torch.randn(3, 1, 3, 3, 3, generator=g, dtype=torch.float64)
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    (fused,) = state_fusion(h, [w], 1.0)
    centre_taps = w[:, 0, 1].sum(dim=(-1, -2)).view(1, 3, 1, 1, 1)
    assert torch.allclose(fused[interior], (value * centre_taps).expand_as(fused[interior]), atol=1e-12)
    (plain,) = state_fusion(h, [w], 0.0)
    all_taps = w.sum(dim=(1, 2, 3, 4)).view(1, 3, 1, 1, 1)
    assert torch.allclose(plain[interior], (value * all_taps).expand_as(plain[interior]), atol=1e-12)
    assert not torch.allclose(fused[interior], plain[interior])


@pytest.mark.parametrize("backend", ["conv", "shift"])
def test_gradients_match_reference_including_theta(backend):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(1, 4, 5, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, 5, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    theta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    gout = torch.randn(1, 4, 5, 5, 5, generator=g, dtype=torch.float64)
    a = torch.autograd.grad(state_fusion(h, [w], theta, backend=backend)[0], [h, w, theta], gout)
    b = torch.autograd.grad(naive_cfd(h, w, theta), [h, w, theta], gout)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-10)


def test_aswm_weights_sum_to_one_over_scales():
    fusion = StateFusion(8, (3, 5, 7), theta=0.7, theta_learnable=True, use_aswm=True, init="uniform").double()
    torch.nn.init.normal_(fusion.aswm.weight, std=1.0)     # far from the near-uniform init
    h = torch.randn(2, 8, 4, 5, 5, dtype=torch.float64)
    fused = state_fusion(h, list(fusion.kernels), fusion.theta)
    alpha = fusion.scale_weights(fused)
    assert alpha.shape == (2, 3, 4, 5, 5)
    assert (alpha > 0).all()
    assert torch.allclose(alpha.sum(dim=1), torch.ones(2, 4, 5, 5, dtype=alpha.dtype), atol=1e-6)
    assert alpha.std(dim=1).mean() > 0.05                    # the weights really vary by position and scale
    out = fusion(h)
    want = sum(alpha[:, m:m + 1] * f for m, f in enumerate(fused))
    assert torch.allclose(out, want)


def test_errors():
    h = torch.randn(1, 4, 3, 3, 3)
    with pytest.raises(ValueError, match="k odd"):
        state_fusion(h, [torch.randn(4, 1, 2, 2, 2)], 0.7)
    with pytest.raises(ValueError, match=r"\[batch, C, T, H, W\]"):
        state_fusion(h[0], [torch.randn(4, 1, 3, 3, 3)], 0.7)
    with pytest.raises(ValueError, match="unknown state-fusion backend"):
        state_fusion(h, [torch.randn(4, 1, 3, 3, 3)], 0.7, backend="nope")
    with pytest.raises(ValueError, match="ASWM"):
        StateFusion(4, (3,), 0.7, False, use_aswm=True)
    with pytest.raises(ValueError, match="fusion_init must be"):
        StateFusion(4, (3,), 0.7, False, use_aswm=False, init="ones")


def test_zero_init_starts_as_the_backbone_and_still_learns():
    """fusion_init="zero": the fused states are 0 at init (the block is the backbone's), yet every kernel and
    the ASWM get a non-zero gradient at the first step, so the fusion is learned rather than stuck at zero."""
    fusion = StateFusion(8, (3, 5), theta=0.7, theta_learnable=False, use_aswm=True).double()
    h = torch.randn(2, 8, 4, 5, 5, dtype=torch.float64)
    out = fusion(h)
    assert torch.count_nonzero(out) == 0
    out.mul(torch.randn_like(out)).sum().backward()
    assert all(w.grad.abs().max() > 0 for w in fusion.kernels)
    with torch.no_grad():                     # one SGD step: the kernels leave zero, ASWM's input is now non-zero
        for w in fusion.kernels:
            w -= 0.1 * w.grad
    fusion.zero_grad()
    fusion(h).mul(torch.randn_like(h)).sum().backward()
    assert fusion.aswm.weight.grad.abs().max() > 0


@pytest.mark.parametrize("backend", ["conv", "shift", "ref", "gemm", "fft"])
@pytest.mark.parametrize("use_aswm", [False, True])
def test_inference_reuses_the_folded_kernels_and_follows_them(backend, use_aswm):
    """With inference_cache on and without autograd StateFusion folds the CFD term into its kernels once per dtype
    and reuses them (the same tensors on the next call), refolding after any change to a kernel or theta; outputs
    equal the autograd path's (which folds every call) to float64 rounding."""
    torch.manual_seed(0)
    scales = (3, 5) if use_aswm else (3,)
    fusion = StateFusion(4, scales, 0.7, True, use_aswm=use_aswm, backend=backend, init="uniform",
                         dtype=torch.float64)
    h = torch.randn(2, 4, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        fusion(h)
    assert "_inference_folded" not in fusion.__dict__   # off unless asked for (evaluation inside training)
    fusion.inference_cache = True

    def both():
        with torch.no_grad():
            fast = fusion(h)
        return fast, fusion(h).detach()

    fast, want = both()
    assert torch.allclose(fast, want, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        first = fusion.folded_kernels(torch.float64)
        assert all(a is b for a, b in zip(fusion.folded_kernels(torch.float64), first))
        assert fusion.folded_kernels(torch.float32)[0].dtype == torch.float32
        fusion.theta.fill_(0.2)
        fast, want = both()
        assert torch.allclose(fast, want, rtol=1e-12, atol=1e-12)
    for i in range(len(scales)):   # one kernel at a time: a key that misses one fails here
        with torch.no_grad():
            fusion.kernels[i].mul_(-1.5)
        fast, want = both()
        assert torch.allclose(fast, want, rtol=1e-12, atol=1e-12), i
    assert not any(a is b for a, b in zip(fusion.folded_kernels(torch.float64), first))


def test_cfd_fold_of_plain_zero_is_the_kernel_itself():
    from msf_scale.ops._cfd import cfd_kernel
    w = torch.randn(4, 1, 3, 3, 3)
    assert cfd_kernel(w, 0.0) is w and cfd_kernel(w, 0) is w
    assert torch.equal(cfd_kernel(w, torch.tensor(0.0)), w)   # a tensor theta folds (its gradient is needed)


def test_cfd_fold_is_a_constant_under_inductor_freezing():
    """Frozen compiled inference (msf_scale.inference's default on CUDA) treats parameters and buffers as constants
    and folds the work done on them alone: the CFD fold must be such work, not a kernel in every forward. The CPU
    compile here names its kernels by the ops they fuse; with the fold folded, the only kernel is the product with x
    (a constructor in the fold, zeros_like, stops Inductor's folding: session 19's profiles had that kernel)."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from msf_scale.ops._cfd import cfd_kernel

    class Folded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(6, 1, 5, 5, 5))
            self.register_buffer("theta", torch.tensor(0.7), persistent=False)

        def forward(self, x):
            return x * cfd_kernel(self.w, self.theta).reshape(6, -1)

    torch._dynamo.reset()
    module, x = Folded().eval(), torch.randn(6, 125)
    with torch.no_grad(), inductor_config.patch(freezing=True):   # (pytest's monkeypatch would delete the setting)
        out, (code, *_) = run_and_get_code(torch.compile(module), x)
        want = x * cfd_kernel(module.w, module.theta).reshape(6, -1)
    torch._dynamo.reset()
    assert torch.allclose(out, want)
    kernels = set(re.findall(r"\b(cpp_fused_\w+|triton_\w+_fused_\w+)\(", code))
    assert kernels, "no kernel names found in Inductor's code"
    assert all(re.fullmatch(r"(cpp|triton_\w+)_fused_mul_\d+", k) for k in kernels), kernels
