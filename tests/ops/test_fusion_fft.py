"""The ``fft`` fusion backend (ops/_fusion_fft.py: products in the frequency domain) against ``ref``.

CPU, float64, to 1e-12 relative: the forward and every gradient (input, each kernel, theta; with ASWM its 1x1 conv's
weight and bias), several scale sets, theta 0 and not, one frame, frames and grids smaller than the window (the
circular wrap must land in zeros). bf16 on CPU (16 channels) and on the GPU (the bench's 384, marked gpu): within the
fixed bounds of float64 the other fused backends meet.
"""
from __future__ import annotations

import pytest
import torch
from fusion_cases import (SHAPES, check_aswm_matches_ref, check_bf16_within_bounds, check_compiled_matches_eager,
                          check_matches_ref, check_module_matches_conv, check_unused_outputs_get_no_gradient, make,
                          rel)

from msf_scale.ops._fusion_fft import fft_size, grid_sizes, multiscale_fusion_fft


@pytest.mark.parametrize("shape", SHAPES + [(1, 2, 8, 14, 14)])
@pytest.mark.parametrize("scales", [(3,), (5,), (3, 5, 7), (7, 3)])
@pytest.mark.parametrize("theta", [0.0, 0.7])
def test_matches_ref_float64(shape, scales, theta):
    check_matches_ref("fft", shape, scales, theta)


def test_unused_outputs_get_no_gradient():
    check_unused_outputs_get_no_gradient("fft")


def test_grid_sizes_leave_room_for_the_largest_window():
    """N >= n + r on every axis (the wrap of a shift by up to r lands in zeros), with factors 2, 3, 5, 7 only."""
    assert [fft_size(n) for n in (1, 11, 13, 17, 22, 121)] == [1, 12, 14, 18, 24, 125]
    assert grid_sizes((1, 1, 8, 14, 14), (3, 5, 7)) == (12, 18, 18)
    assert grid_sizes((1, 1, 8, 14, 14), (3,)) == (9, 15, 15)


@pytest.mark.parametrize("scales", [(3, 5), (3, 5, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_aswm_matches_ref_float64(scales, bias):
    check_aswm_matches_ref(multiscale_fusion_fft, scales, bias)


def test_state_fusion_module_takes_the_fft_path(monkeypatch):
    """StateFusion(backend="fft") runs the fused path (the ASWM on the transforms' float32 output), not state_fusion's
    per-scale fallback, and equals the conv backend's module (output and every gradient)."""
    import msf_scale.models.blocks as blocks

    calls = []
    real = blocks.multiscale_fusion_fft
    monkeypatch.setattr(blocks, "multiscale_fusion_fft", lambda *a, **k: calls.append(1) or real(*a, **k))
    check_module_matches_conv("fft", 8)
    assert len(calls) == 1   # the fft module's one forward (conv's module takes its own path)


@pytest.mark.parametrize("use_aswm", [False, True])
def test_inference_spectra_are_reused_and_follow_grid_and_dtype(use_aswm):
    """With the inference cache on, StateFusion computes the kernels' spectra once per (dtype, grid) and reuses them;
    a new grid or dtype gets its own, and every output equals the conv backend's (a key without the grid size fails on
    the shapes, one without the dtype mixes complex64 into float64)."""
    from msf_scale.models.blocks import StateFusion

    torch.manual_seed(0)
    scales = (3, 5, 7) if use_aswm else (3,)
    mods = [StateFusion(4, scales, 0.7, True, use_aswm=use_aswm, backend=b, init="uniform") for b in ("fft", "conv")]
    mods[1].load_state_dict(mods[0].state_dict())
    mods[0].inference_cache = True
    for shape, dtype in (((2, 4, 3, 5, 6), torch.float32), ((2, 4, 3, 5, 6), torch.float32),
                         ((1, 4, 4, 6, 5), torch.float32), ((1, 4, 4, 6, 5), torch.float64)):
        x = torch.randn(shape, dtype=dtype)
        for mod in mods:
            mod.to(dtype)
        with torch.no_grad():
            before = mods[0].__dict__.get("_inference_spectra")
            got, want = mods[0](x), mods[1](x)
            after = mods[0].__dict__["_inference_spectra"]
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert got.dtype == dtype and rel(got, want) < tol, (shape, dtype, rel(got, want))
        assert after[1].dtype == (torch.complex128 if dtype == torch.float64 else torch.complex64)
        assert after[1].shape[-3:-1] == grid_sizes(shape, scales)[:2]
        if before is not None and before[0] == after[0]:
            assert before[1] is after[1]   # reused, not rebuilt
    assert before is not None and before[1] is not after[1]   # the last call (float64) built its own


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_aswm_stays_float32_under_autocast(device):
    """Under bf16 autocast (how the model trains and infers) the ASWM's products must not drop to bf16 matmuls: the
    output equals the same call without autocast to float32 rounding before the final cast (bf16 matmuls in the ASWM
    move it by ~1e-2 of its largest value)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    h, ks = make((2, 16, 4, 6, 6), (3, 5, 7), dtype=torch.float32, device=device)
    th = torch.tensor(0.7, device=device)
    aw, ab = torch.randn(3, 48, 1, 1, 1, device=device) * 0.5, torch.randn(3, device=device)
    with torch.no_grad():
        plain = multiscale_fusion_fft(h, ks, th, aw, ab)
        with torch.autocast(device, dtype=torch.bfloat16):
            auto = multiscale_fusion_fft(h, ks, th, aw, ab)
    assert auto.dtype == torch.float32
    assert rel(auto, plain) < 1e-5, rel(auto, plain)


def _fft(h, ks, th, aw, ab):
    return multiscale_fusion_fft(h, ks, th, aw, ab)


@pytest.mark.parametrize("kernels_fp32", [False, True])
def test_bf16_within_fixed_bounds(kernels_fp32):
    """CPU, 16 channels: bf16 in, the output and every gradient within fixed bounds of float64 (the transforms run
    in float32; one rounding of each output)."""
    check_bf16_within_bounds(_fft, "cpu", 16, kernels_fp32)


@pytest.mark.gpu
@pytest.mark.parametrize("kernels_fp32", [False, True])
def test_gpu_bf16_within_fixed_bounds(kernels_fp32):
    """CUDA (cuFFT), the bench width (384 channels): as the CPU test; prints the errors."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    check_bf16_within_bounds(_fft, "cuda", 384, kernels_fp32, label="fft")


def test_compiles_with_fullgraph():
    """The fft path traces whole under torch.compile(fullgraph=True) (the transforms stay library calls): compiled
    output and gradients equal eager's."""
    check_compiled_matches_eager("fft", 8, (3, 5, 7))


def test_kernel_spectra_are_a_constant_under_inductor_freezing():
    """Frozen compiled inference (msf_scale.inference's default on CUDA) folds the work done on parameters alone: the
    kernels' spectra (CFD fold, placement, transform) must be such work, not three transforms in every forward.
    torch.roll's index constructor stopped the folding (the placement is written with slices for that)."""
    import re

    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from msf_scale.ops._fusion_fft import kernel_spectra

    class Spectra(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(6, 1, 5, 5, 5))
            self.register_buffer("theta", torch.tensor(0.7), persistent=False)

        def forward(self, x):
            spectra = torch.view_as_real(kernel_spectra([self.w], self.theta, (8, 9, 10), torch.float32))
            return x * spectra.reshape(6, -1)[:, :125]

    torch._dynamo.reset()
    module, x = Spectra().eval(), torch.randn(6, 125)
    with torch.no_grad(), inductor_config.patch(freezing=True):   # (pytest's monkeypatch would delete the setting)
        out, (code, *_) = run_and_get_code(torch.compile(module), x)
        want = module(x)
    torch._dynamo.reset()
    torch.testing.assert_close(out, want)
    assert "_fft_r2c" not in code, "the kernels' transform runs in every frozen forward"
    kernels = set(re.findall(r"\b(cpp_fused_\w+|triton_\w+_fused_\w+)\(", code))
    assert kernels and all(re.fullmatch(r"(cpp|triton_\w+)_fused_mul_\d+", k) for k in kernels), kernels
