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
from fusion_cases import (SHAPES, check_aswm_matches_ref, check_bf16_within_bounds, check_compiled_matches_eager,
                          check_matches_ref, check_module_matches_conv, check_unused_outputs_get_no_gradient)

from msf_scale.ops._fusion_gemm import multiscale_fusion_gemm


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scales", [(3,), (5,), (3, 5, 7), (7, 3)])
@pytest.mark.parametrize("theta", [0.0, 0.7])
def test_matches_ref_float64(shape, scales, theta):
    check_matches_ref("gemm", shape, scales, theta)


def test_unused_outputs_get_no_gradient():
    check_unused_outputs_get_no_gradient("gemm")


@pytest.mark.parametrize("scales", [(3, 5), (3, 5, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_aswm_matches_ref_float64(scales, bias):
    check_aswm_matches_ref(multiscale_fusion_gemm, scales, bias)


def test_state_fusion_module_takes_the_gemm_path():
    check_module_matches_conv("gemm", 8)


def _gemm(h, ks, th, aw, ab):
    return multiscale_fusion_gemm(h, ks, th, aw, ab)


@pytest.mark.parametrize("kernels_fp32", [False, True])
@pytest.mark.parametrize("seed", [0, 4])
def test_bf16_within_fixed_bounds(kernels_fp32, seed):
    """CPU, 16 channels: bf16 in, the output and every gradient within fixed bounds of float64 (the GEMMs accumulate in
    fp32; one rounding of each output)."""
    check_bf16_within_bounds(_gemm, "cpu", 16, kernels_fp32, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("kernels_fp32", [False, True])
def test_gpu_bf16_within_fixed_bounds(kernels_fp32):
    """CUDA, the bench width (384 channels): as the CPU test; prints the errors."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    check_bf16_within_bounds(_gemm, "cuda", 384, kernels_fp32, label="gemm")


def test_compiles_with_fullgraph():
    """The models compile with fullgraph=True; the gemm path (auto's GPU choice for training) must trace whole:
    compiled output and gradients equal eager's; without dynamo tracing through an lru_cache (it warns: a cached
    value it would not see change)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lru_cache.*")
        check_compiled_matches_eager("gemm", 8, (3, 5, 7))
