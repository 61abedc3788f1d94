"""The ``triton`` selective-scan backend (ops/_scan_triton.py) and ``reverse_groups``.

On CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET), in float64 against
per-group ``selective_scan_ref`` calls written out here (reversed groups: flipped in, flipped back): the output, the
last state and every gradient to 1e-12 relative, over lengths inside one tile, on a tile boundary and over several
tiles, several programs per group (the atomically added dB, dC), a group width that is not a multiple of the tile's
channels, ungrouped B/C, every optional input present or absent. ``reverse_groups`` on every other backend (by
flipping) gives the same result; the bidirectional mixer's grouped path on the triton scan (no flipped copies)
matches its two-call path. On the GPU (marked gpu): bf16 and fp32 against float64 at the models' length.
"""
from __future__ import annotations

import copy

import pytest
import torch
from test_selective_scan import make_inputs, rel

pytest.importorskip("triton")

from msf_scale.models.blocks import BiMamba  # noqa: E402
from msf_scale.ops import _scan_triton, selective_scan, selective_scan_ref  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
OPTIONAL = ("D", "z", "delta_bias")


@pytest.fixture(params=[(False, 0), (True, 0), (True, 16)], ids=["atomic", "partials", "chunked"])
def small_tiles(monkeypatch, request):
    """8 steps per tile, 4 channels per program (2 in the backward), one warp: several tiles and programs at
    interpreter-sized shapes; dB and dC added atomically or summed from per-program partials; "chunked": the forward
    split into sequence chunks until it has 16 programs (2 chunks of 2 tiles at batch 2, 16 channels and length 29;
    a chunk per tile with fewer programs), the backward running from the chunked forward's saved states."""
    partials, chunk_programs = request.param
    monkeypatch.setattr(_scan_triton, "CONFIG", {"BT": 8, "BD": 4, "warps": 1, "bwd_BD": 2, "bwd_warps": 1,
                                                 "partials": partials, "chunk_programs": chunk_programs})


def inputs(batch, groups, width, n, length, dtype=torch.float64, seed=0, device="cpu"):
    """make_inputs at dim = groups x width with B, C [batch, G, N, L] (G = 0: ungrouped [batch, N, L])."""
    x = make_inputs(batch, max(groups, 1) * width, n, length, dtype, device=device, seed=seed)
    if groups:
        g = torch.Generator().manual_seed(seed + 1)
        for k in ("B", "C"):
            x[k] = torch.randn(batch, groups, n, length, generator=g, dtype=torch.float64).to(device, dtype)
            x[k].requires_grad_()
    return x


def reference(x, reverse, optional, softplus):
    """Per-group float64 selective_scan_ref calls; the last ``reverse`` groups on time-flipped inputs, their
    output flipped back. Returns (y, last state)."""
    B, C = x["B"], x["C"]
    grouped = B.dim() == 4
    groups = B.shape[1] if grouped else 1
    width = x["u"].shape[1] // groups
    ys, lasts = [], []
    for g in range(groups):
        chan = slice(g * width, (g + 1) * width)
        flip = (lambda t: t.flip(-1)) if g >= groups - reverse else (lambda t: t)
        opt = {k: (x[k][chan] if x[k].dim() == 1 else flip(x[k][:, chan])) if optional else None for k in OPTIONAL}
        y, last = selective_scan_ref(flip(x["u"][:, chan]), flip(x["delta"][:, chan]), x["A"][chan],
                                     flip(B[:, g] if grouped else B), flip(C[:, g] if grouped else C), opt["D"],
                                     opt["z"], opt["delta_bias"], softplus, True)
        ys.append(flip(y))
        lasts.append(last)
    return torch.cat(ys, dim=1), torch.cat(lasts, dim=1)


def check(x, reverse=0, optional=True, softplus=True, backend="triton", tol=1e-12):
    args = [x[k] if k not in OPTIONAL or optional else None for k in NAMES]
    present = [a for a in args if a is not None]
    y, last = selective_scan(*args, delta_softplus=softplus, return_last_state=True, backend=backend,
                             reverse_groups=reverse)
    y_ref, last_ref = reference(x, reverse, optional, softplus)
    assert y.dtype == x["u"].dtype and y.shape == y_ref.shape
    assert rel(y, y_ref) < tol, f"y: {rel(y, y_ref):.2e}"
    assert rel(last, last_ref) < tol, f"last state: {rel(last, last_ref):.2e}"
    w = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = torch.autograd.grad(y, present, w.to(y.dtype))
    ref_grads = torch.autograd.grad(y_ref, present, w)
    names = [k for k, a in zip(NAMES, args) if a is not None]
    for name, got, want in zip(names, grads, ref_grads):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert rel(got, want) < tol, f"d{name}: {rel(got, want):.2e}"


@pytest.mark.parametrize("length", [5, 8, 29])          # inside one tile, on its boundary, four tiles
@pytest.mark.parametrize("reverse", [0, 1, 2])
def test_matches_ref_float64(small_tiles, length, reverse):
    check(inputs(2, 2, 8, 4, length), reverse)         # two programs per group


@pytest.mark.parametrize("optional", [False, True])
@pytest.mark.parametrize("softplus", [False, True])
def test_optional_inputs_and_softplus(small_tiles, optional, softplus):
    check(inputs(1, 2, 4, 4, 11, seed=3), 1, optional, softplus)


def test_softplus_linear_branch(small_tiles):
    """delta + bias over 20: softplus is the identity there (as torch's), forward and gradient."""
    x = inputs(1, 2, 4, 4, 11, seed=4)
    with torch.no_grad():
        x["delta"][:, :, ::3] += 30.0
        x["A"].mul_(1e-2)   # keeps exp(delta A) away from underflow, so the states still carry the branch
    check(x, 1)


def test_ungrouped_and_odd_group_width(small_tiles):
    check(inputs(2, 0, 6, 4, 13))                      # B, C [batch, N, L]; 6 channels: 2 per program
    check(inputs(1, 3, 6, 2, 13, seed=5), 2)           # three groups of 6 channels, the last two reversed


@pytest.mark.parametrize("programs, tiles, want", [(64, 10, (1, 10)), (2, 5, (3, 2)), (2, 2, (2, 1)),
                                                    (1, 100, (6, 17)), (8, 4, (2, 2)), (2, 1, (1, 1)),
                                                    (2, 0, (1, 0)), (0, 5, (1, 5))])
def test_chunking(monkeypatch, programs, tiles, want):
    """Chunks until the forward has chunk_programs (here 6) programs, at most one per tile, equal whole chunks;
    one chunk for an empty sequence or no programs."""
    monkeypatch.setitem(_scan_triton.CONFIG, "chunk_programs", 6 if programs != 8 else 16)
    assert _scan_triton.chunking(programs, tiles) == want


def test_chunked_forward_whose_last_chunk_ends_past_the_sequence(small_tiles, monkeypatch):
    """3 chunks of 2 tiles over 5 tiles (length 37): the last chunk's second tile is all past L; the reversed group
    walks the chunks from t = L - 1."""
    monkeypatch.setitem(_scan_triton.CONFIG, "chunk_programs", 6)
    assert _scan_triton.chunking(2, 5) == (3, 2)
    grids = {}

    class Spy:   # records each kernel's launch grid, then launches it
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            grids.setdefault(self.name, []).append(grid)
            return self.kernel[grid]
    for name in ("_chunk_ends", "_scan_fwd"):
        monkeypatch.setattr(_scan_triton, name, Spy(name, getattr(_scan_triton, name)))
    check(inputs(1, 2, 4, 4, 37, seed=12), 1)
    # 2 programs of 4 channels, 3 chunks; the last chunk's end is never read, so the first pass skips it
    assert grids == {"_chunk_ends": [(1, 2, 2)], "_scan_fwd": [(1, 2, 3)]}


def test_default_tiles():
    """CONFIG as shipped (16-step tiles, 4 channels per program, dB / dC partials), a length over two tiles."""
    check(inputs(1, 2, 16, 4, 40, seed=6), 1)


def test_strided_views(small_tiles):
    """The layouts the mixer hands over and views a caller might: u, delta, z as transposes of time-major
    [batch, L, D] tensors, B, C permuted from [batch, L, G, N], A transposed, D and delta_bias strided views."""
    x = inputs(2, 2, 4, 4, 11, seed=8)
    g = torch.Generator().manual_seed(9)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    for k in ("u", "delta", "z"):
        x[k] = r(2, 11, 8).transpose(1, 2).requires_grad_()
    for k in ("B", "C"):
        x[k] = r(2, 11, 2, 4).permute(0, 2, 3, 1).requires_grad_()
    x["A"] = (-r(4, 8).abs()).t().requires_grad_()
    x["D"] = r(16)[::2].requires_grad_()
    x["delta_bias"] = (0.5 * r(17))[1::2].requires_grad_()
    assert not any(x[k].is_contiguous() for k in NAMES)
    check(x, 1)


def test_reverses_in_the_kernel(small_tiles, monkeypatch):
    """reverse_groups reaches the kernel (no flipped copies): the flipping path is never taken."""
    from msf_scale.ops import scan as scan_mod

    def no_flips(*args, **kwargs):
        raise AssertionError("the triton backend took the flipping path")
    monkeypatch.setattr(scan_mod, "_by_flipping", no_flips)
    launched = []
    real = _scan_triton.scan
    monkeypatch.setattr(_scan_triton, "scan", lambda *a: launched.append(a[-1]) or real(*a))
    check(inputs(1, 2, 4, 4, 9, seed=10), 1)
    assert launched == [1]


def test_states_saved_only_when_a_gradient_can_follow(small_tiles, monkeypatch):
    saved = []
    real = _scan_triton.forward
    monkeypatch.setattr(_scan_triton, "forward", lambda *a: saved.append(a[-1]) or real(*a))
    x = inputs(1, 2, 4, 4, 9)
    args = [x[k] for k in NAMES]
    with torch.no_grad():
        selective_scan(*args, backend="triton", reverse_groups=1)
    selective_scan(*(a.detach() for a in args), backend="triton", reverse_groups=1)
    selective_scan(*args, backend="triton", reverse_groups=1)
    assert saved == [False, False, True]


def test_refuses_sizes_past_int32_offsets():
    """The kernels index with int32: a call whose tensors or buffers reach 2^31 elements fails before launching
    (expanded views: no memory behind the sizes)."""
    big = torch.zeros(1, 1, 1, dtype=torch.float64).expand(64, 2048, 2 ** 15)
    B = torch.zeros(1, 1, 1, 1, dtype=torch.float64).expand(64, 2, 16, 2 ** 15)
    A = -torch.ones(2048, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="int32"):
        selective_scan(big, big, A, B, B, backend="triton", reverse_groups=1)


@pytest.mark.parametrize("backend", ["ref", "torch", "numba"])
def test_reverse_groups_by_flipping(backend):
    """Backends that scan forwards only get flipped copies: the same result."""
    if backend == "numba":
        pytest.importorskip("numba")
    check(inputs(2, 2, 4, 4, 9, seed=2), 1, backend=backend, tol=1e-11)


def test_reverse_groups_needs_groups():
    x = inputs(1, 0, 4, 4, 5)
    with pytest.raises(ValueError, match="reverse_groups=1 needs grouped B/C"):
        selective_scan(*(x[k] for k in NAMES), reverse_groups=1, backend="ref")
    x = inputs(1, 2, 4, 4, 5)
    with pytest.raises(ValueError, match="reverse_groups=3 needs grouped B/C with at least that many"):
        selective_scan(*(x[k] for k in NAMES), reverse_groups=3, backend="ref")


def test_no_states_saved_without_gradients(small_tiles):
    x = {k: v.detach() for k, v in inputs(1, 2, 4, 4, 9).items()}
    y, last, states = _scan_triton.forward(*(x[k] for k in NAMES), True, 1, False)
    assert states is None
    y_ref, last_ref = reference(x, 1, True, True)
    assert rel(y, y_ref) < 1e-12 and rel(last, last_ref) < 1e-12


def test_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = inputs(1, 2, 4, 4, 5)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        selective_scan(*(x[k] for k in NAMES), backend="triton")


def test_bimamba_grouped_on_triton_matches_two_calls(small_tiles, monkeypatch):
    """The mixer's grouped path on the triton scan (anticausal conv, group 1 reversed in the kernel, no flips)
    against its two-call path (flipped copies, ref scans): output and every parameter's gradient (float64 model;
    A_log and D stay float32 parameters, so theirs agree to float32 rounding)."""
    launched = []
    real = _scan_triton.scan
    monkeypatch.setattr(_scan_triton, "scan", lambda *a: launched.append(a[-1]) or real(*a))
    torch.manual_seed(0)
    two_calls = BiMamba(8, d_state=4, expand=2, scan_backend="ref", dtype=torch.float64)
    two_calls.reset_parameters()
    one_call = copy.deepcopy(two_calls)
    one_call.grouped_scan, one_call.scan_backend = True, "triton"
    x = torch.randn(2, 13, 8, dtype=torch.float64, requires_grad=True)
    y_ref, y = two_calls(x), one_call(x)
    assert rel(y, y_ref) < 1e-12
    w = torch.randn_like(y)
    ref_grads = torch.autograd.grad(y_ref, [x, *two_calls.parameters()], w)
    grads = torch.autograd.grad(y, [x, *one_call.parameters()], w)
    for (name, _), got, want in zip([("x", x), *two_calls.named_parameters()], grads, ref_grads):
        tol = 1e-6 if want.dtype == torch.float32 else 1e-12   # A_log and D are float32 parameters: fp32 rounding
        assert rel(got, want) < tol, f"{name}: {rel(got, want):.2e}"
    assert launched == [1], "the mixer did not hand the backward direction to the kernel reversed"


@pytest.mark.gpu
@pytest.mark.parametrize("partials", [False, True])
@pytest.mark.parametrize("dtype, tol, grad_tol", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 2e-2, 5e-2)])
def test_gpu_matches_float64(monkeypatch, dtype, tol, grad_tol, partials):
    """The models' length (1569 = 8 x 14 x 14 + 1) on the shipped tiles, one group reversed; A, D, delta_bias fp32
    (model parameters); y and every gradient within the bounds relative to float64 on CPU."""
    monkeypatch.setitem(_scan_triton.CONFIG, "partials", partials)
    x = inputs(2, 2, 64, 16, 1569, dtype, device="cuda")
    for k in ("A", "D", "delta_bias"):
        x[k] = x[k].detach().float().requires_grad_()
    y = selective_scan(*(x[k] for k in NAMES), delta_softplus=True, backend="triton", reverse_groups=1)
    ref_in = {k: v.detach().cpu().double().requires_grad_() for k, v in x.items()}
    y_ref, _ = reference(ref_in, 1, True, True)
    assert rel(y.cpu(), y_ref) < tol, f"y: {rel(y.cpu(), y_ref):.2e}"
    w = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, [x[k] for k in NAMES], w.to("cuda", dtype))
    ref_grads = torch.autograd.grad(y_ref, [ref_in[k] for k in NAMES], w)
    for name, got, want in zip(NAMES, grads, ref_grads):
        assert rel(got.cpu(), want) < grad_tol, f"d{name}: {rel(got.cpu(), want):.2e}"


def test_default_tiles_compile_for_hopper_without_spills():
    """The forward and backward at the models' length with CONFIG's tiles, compiled for sm_90 on this machine
    (benchmarks/kernel_resources.py --scan-tiles: Triton's ahead-of-time compile and ptxas -v): they compile (the
    interpreter checks no compiler limit) and spill no registers; also the chunked forward's two kernels. Compile-time
    facts."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = _scan_triton.CONFIG
    tiles = {"forward": f"{cfg['BD']},{cfg['BT']},{cfg['warps']}",
             "backward": f"{cfg['bwd_BD']},{cfg['BT']},{cfg['bwd_warps']}"}
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "kernel_resources.py"), "--json",
                          *(a for t in tiles.values() for a in ("--scan-tiles", t))],
                         capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    checked = [r for r in rows if r["setting"] == tiles["backward" if "backward" in r["kernel"] else "forward"]]
    chunks = _scan_triton.chunking(2 * 384 // cfg["BD"], -(-1569 // cfg["BT"]))[0]
    assert sorted(r["kernel"] for r in checked) == [   # the chunked pair: batch-1 tiny inference
        "scan backward L=1569", f"scan chunk ends NC={chunks} L=1569", "scan forward L=1569",
        f"scan forward NC={chunks} L=1569"], rows
    for r in checked:
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, r
