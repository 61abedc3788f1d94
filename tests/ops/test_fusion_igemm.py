"""The ``igemm`` fusion backend (ops/_fusion_igemm.py: implicit GEMMs in Triton) against ``ref``.

On CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET): float64 to 1e-12
relative, the forward and every gradient (input, each kernel, theta), several scale sets, theta 0 and not, the
grids of fusion_cases.SHAPES plus more rows and positions than one tile holds and a row wider than 16; ASWM
through StateFusion; fp32 within 1e-5. On the GPU (marked gpu): bf16 at the bench's width within the fixed bounds
the gemm backend meets (bf16 and fp32 kernels), and fp32.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fusion_cases import (SHAPES, aswm_ref, check_bf16_within_bounds, check_compiled_matches_eager,  # noqa: E402
                          check_matches_ref, check_module_matches_conv, check_unused_outputs_get_no_gradient, make,
                          rel)

from msf_scale.ops import state_fusion, state_fusion_ref  # noqa: E402
from msf_scale.ops import _fusion_igemm  # noqa: E402

# beyond fusion_cases.SHAPES: a 14 x 14 grid (the models') with rows over one 128-row tile (224 rows: two tiles, the
# second partial; 8 frames, so the 7-frame window fits whole around the middle ones), W = 16 (reach 22 > 16;
# W = 20 with the 7 x 7 x 7 window would need a kernel-gradient tile over MAX_GRAD_TILE: the gemm fallback)
WIDE = [(2, 2, 8, 14, 14), (1, 1, 2, 3, 16)]


def _check(shape, scales, theta, seed=0):
    assert _fusion_igemm.supported(*make(shape, scales)), "the case would test the gemm fallback, not igemm"
    check_matches_ref("igemm", shape, scales, theta, seed)


def _ids(cases):
    """Readable ids for (shape, scales, theta) / (scales, theta, form) cases: 2x3x4x5x6-k3_5_7-theta0.7."""
    return ["-".join("x".join(map(str, v)) if isinstance(v, tuple) and len(v) == 5 else
                     "k" + "_".join(map(str, v)) if isinstance(v, tuple) else
                     f"theta{v}" if isinstance(v, float) else str(v) for v in case) for case in cases]


# theta is folded into the taps in torch (cfd_kernel) before the launches: the kernels run the same code at every
# theta, so the grid runs at 0.7 and one case at theta 0 (the fold's gradient there)
MATCH_CASES = [(shape, scales, 0.7) for shape in SHAPES for scales in [(3,), (5,), (3, 5, 7), (7, 3)]] + [
    (SHAPES[0], (7, 3), 0.0)]


@pytest.mark.parametrize("shape, scales, theta", MATCH_CASES, ids=_ids(MATCH_CASES))
def test_matches_ref_float64(shape, scales, theta):
    _check(shape, scales, theta)


@pytest.mark.parametrize("shape", WIDE)
def test_matches_ref_float64_over_several_tiles(shape):
    _check(shape, (3, 5, 7), 0.7, seed=1)


def test_matches_ref_float64_outputs_wider_than_16():
    """W = 20: 32 output columns per tile (XN), the 3 x 3 x 3 window (R = 1) keeping the tiles within limits."""
    _check((1, 2, 3, 4, 20), (3,), 0.7, seed=1)


def test_matches_ref_float64_kernel_gradient_over_many_row_steps(monkeypatch):
    """One kernel-gradient program per (channel, frame offset): each walks every (clip, frame, row) in many steps."""
    monkeypatch.setitem(_fusion_igemm.CONFIG, "grad_programs", 1)
    _check((2, 3, 4, 5, 6), (3, 5), 0.7)


def test_matches_ref_float64_small_tiles(monkeypatch):
    """16-row tiles and 16-column K steps: many row tiles per channel, many K steps per frame offset."""
    monkeypatch.setitem(_fusion_igemm.CONFIG, "BM", 16)
    monkeypatch.setitem(_fusion_igemm.CONFIG, "BK", 16)
    _check((2, 2, 4, 5, 6), (3, 5, 7), 0.7)


@pytest.mark.parametrize("scales", [(3, 5, 7), (7, 3), (1, 3), (5,)])
def test_matches_ref_float64_nested_loop(monkeypatch, scales):
    """CONFIG["flat"] off (the default is on since session 10): a loop per frame offset and K steps inside it, each
    window's own bands (the tests above run the flat loop: one loop over (frame offset, K step))."""
    monkeypatch.setitem(_fusion_igemm.CONFIG, "flat", False)
    monkeypatch.setitem(_fusion_igemm.CONFIG, "BK", 16)
    _check((2, 3, 4, 5, 6), scales, 0.7)


@pytest.mark.parametrize("shape", SHAPES + [WIDE[1], (1, 2, 3, 14, 14)])
def test_matches_ref_float64_nested_loop_over_row_tiles(monkeypatch, shape):
    """The nested loop with 16-row tiles: several row tiles per channel on every grid (the models' 14 x 14 at a
    size the interpreter takes in seconds)."""
    monkeypatch.setitem(_fusion_igemm.CONFIG, "flat", False)
    monkeypatch.setitem(_fusion_igemm.CONFIG, "BM", 16)
    _check(shape, (3, 5, 7), 0.7, seed=2)


@pytest.mark.parametrize("flat", [False, True])
def test_reads_nothing_outside_the_padded_states(monkeypatch, flat):
    """The padded states inside a NaN-filled buffer: a kernel that reads past them (the A tile's column mask
    dropped, say) turns outputs or gradients NaN, which the interpreter's float64 check alone would not see (the
    extra columns meet zero band rows)."""
    pad = _fusion_igemm.Geometry.pad

    def pad_in_nan(self, x):
        p, guard = pad(self, x), 4096
        buf = torch.full((p.numel() + 2 * guard,), float("nan"), dtype=p.dtype)
        inner = buf[guard:guard + p.numel()].view(p.shape)
        inner.copy_(p)
        return inner

    monkeypatch.setattr(_fusion_igemm.Geometry, "pad", pad_in_nan)
    monkeypatch.setitem(_fusion_igemm.CONFIG, "flat", flat)
    for shape, scales in (((1, 2, 1, 1, 1), (7, 3)), ((2, 2, 3, 4, 5), (3, 5, 7))):
        h, ks = make(shape, scales)
        out = state_fusion(h, ks, 0.7, backend="igemm")
        grads = torch.autograd.grad(sum(o.sum() for o in out), [h, *ks])
        assert all(t.isfinite().all() for t in (*out, *grads))


def test_matches_ref_float64_one_by_one_window():
    _check((2, 3, 4, 5, 6), (1, 3), 0.7)


def test_unused_outputs_get_no_gradient():
    check_unused_outputs_get_no_gradient("igemm")


def test_state_fusion_module_with_aswm():
    check_module_matches_conv("igemm", 4)


def test_shapes_it_does_not_take_go_to_gemm(monkeypatch):
    """Four windows, or a row wider than MAX_REACH with the window's reach, or a kernel-gradient tile over
    MAX_GRAD_TILE: the gemm backend, same result."""
    h, ks = make((1, 2, 2, 3, 4), (3, 3, 5, 3))
    assert not _fusion_igemm.supported(h, ks)
    got = state_fusion(h, ks, 0.3, backend="igemm")
    for a, b in zip(got, state_fusion_ref(h, ks, 0.3)):
        assert rel(a, b) < 1e-12
    h, ks = make((1, 2, 2, 3, 7), (3,))
    assert _fusion_igemm.supported(h, ks)
    for limit, value in (("MAX_REACH", 8), ("MAX_GRAD_TILE", 16 * 4 * 16 - 1)):
        with monkeypatch.context() as m:
            m.setattr(_fusion_igemm, limit, value)
            assert not _fusion_igemm.supported(h, ks)
            assert rel(state_fusion(h, ks, 0.3, backend="igemm")[0], state_fusion_ref(h, ks, 0.3)[0]) < 1e-12
    assert not _fusion_igemm.supported(*make((1, 1, 1, 2, 50), (7,)))   # Q [64, 512]: would spill


def test_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h, ks = make((1, 2, 2, 3, 4), (3,))
    if h.device.type != "cuda":
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            state_fusion(h, ks, 0.3, backend="igemm")


def _igemm(h, ks, th, aw, ab):
    return aswm_ref(state_fusion(h, ks, th, backend="igemm"), aw, ab)


def _fp32_errors(device, shape):
    """fp32 states and kernels (IEEE dots) against float64 from the same inputs: relative errors of the outputs and
    of the gradients of h, each kernel and theta."""
    h, ks = make(shape, (3, 5, 7), dtype=torch.float32, device=device)
    th = torch.tensor(0.7, device=device, requires_grad=True)
    got = state_fusion(h, ks, th, backend="igemm")
    x64 = [x.detach().double().requires_grad_() for x in (h, *ks, th)]
    want = state_fusion_ref(x64[0], x64[1:4], x64[4])
    gouts = [torch.randn_like(b) for b in want]
    ga = torch.autograd.grad(got, [h, *ks, th], [g.float() for g in gouts])
    gb = torch.autograd.grad(want, x64, gouts)
    return [rel(a, b) for a, b in zip(got, want)] + [rel(a, b) for a, b in zip(ga[:4], gb[:4])]


def test_fp32_matches_float64():
    """CPU (interpreter; its bf16 arithmetic is not the GPU's, so bf16 is checked on the GPU only): fp32 in, every
    output and gradient (theta's aside: it cancels) within 1e-5 of float64."""
    errs = _fp32_errors("cpu", (2, 3, 4, 6, 7))
    assert max(errs) < 1e-5, [f"{e:.1e}" for e in errs]


@pytest.mark.gpu
@pytest.mark.parametrize("kernels_fp32", [False, True])
def test_gpu_bf16_within_fixed_bounds(kernels_fp32):
    """CUDA, the bench width (384 channels): as the CPU test; prints the errors."""
    check_bf16_within_bounds(_igemm, "cuda", 384, kernels_fp32, label="igemm")


@pytest.mark.gpu
def test_gpu_fp32_matches_float64(monkeypatch):
    """CUDA, fp32 states with IEEE dots (TF32 off): within 1e-5 of float64, as on CPU."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    errs = _fp32_errors("cuda", (4, 32, 8, 14, 14))
    assert max(errs) < 1e-5, [f"{e:.1e}" for e in errs]


def test_opcheck_forward_and_backward_ops():
    """The custom ops torch.compile sees: schema, fake shapes, autograd registration (torch.library.opcheck)."""
    h, ks = make((2, 2, 2, 4, 5), (3, 5))
    taps = [w.detach().reshape(2, -1).requires_grad_() for w in ks]
    torch.library.opcheck(torch.ops.msf_scale.igemm_fusion.default, (h, taps, [3, 5]))
    grads = [torch.randn_like(h) for _ in ks]
    for input_grad in (True, False):
        torch.library.opcheck(torch.ops.msf_scale.igemm_fusion_backward.default,
                              (h.detach(), [t.detach() for t in taps], [3, 5], grads, input_grad))


def test_compiles_with_fullgraph():
    """StateFusion(backend="igemm") with ASWM traces whole under torch.compile(fullgraph=True) (the kernels behind
    custom ops): compiled output and gradients equal eager's."""
    check_compiled_matches_eager("igemm", 4, (3, 5, 7), torch.float64, "aot_eager", (1e-12, 1e-12), (1e-12, 1e-12))


def test_compiles_with_inductor():
    """The default backend (inductor) compiles around the custom ops too (fp32; the ops run the kernels)."""
    check_compiled_matches_eager("igemm", 4, (3, 5), out_tol=(1e-5, 1e-6), grad_tol=(1e-4, 1e-5))


def test_default_tiles_compile_for_hopper_without_spills():
    """The kernels as launched at the bench's shape, compiled for sm_90 on this machine (benchmarks/
    kernel_resources.py: Triton's ahead-of-time compile and ptxas -v): they compile (the interpreter checks no
    compiler limit), spill no registers, and the forward and input gradient use Hopper's wgmma. Compile-time facts."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for flat in (["--nested", "--tiles", "64,32,8,2"], []):   # the nested loop at its session-9 tiles; CONFIG
        out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "kernel_resources.py"), "--json", *flat],
                             capture_output=True, text=True, env=env, cwd=root, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        rows = json.loads(out.stdout.strip().splitlines()[-1])
        assert len(rows) == 3
        for r in rows:
            assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, (flat, r)
            assert r["mma"] == "wgmma" or r["kernel"].startswith("kernel grad"), (flat, r)
