"""The PyTorch scan against a float64 per-step reference: outputs, last state and every gradient."""
import pytest
import torch

from msf_scale.ops import scan as scan_mod
from msf_scale.ops import selective_scan, selective_scan_ref

RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}   # max |diff| / max |ref|
GRAD_RTOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def make_inputs(batch, dim, n, length, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    t = {
        "u": r(batch, dim, length), "delta": 0.5 * r(batch, dim, length).abs(),   # >= 0 as after softplus: a stable recurrence
        "A": -torch.exp(torch.log(torch.arange(1, n + 1, dtype=torch.float64)).repeat(dim, 1) + 0.3 * r(dim, n)),
        "B": r(batch, n, length), "C": r(batch, n, length), "D": r(dim), "z": r(batch, dim, length),
        "delta_bias": 0.5 * r(dim),
    }
    return {k: v.to(device=device, dtype=dtype).requires_grad_() for k, v in t.items()}


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", [1, 2, 7, 130, 1568, 2048 + 16])
@pytest.mark.parametrize("optional", ["none", "all"])
def test_matches_float64_reference(backend, dtype, length, optional):
    x = make_inputs(2, 6, 4, length, dtype)
    kw = dict(delta_softplus=True) if optional == "all" else {}
    args = [x["u"], x["delta"], x["A"], x["B"], x["C"]]
    opt = [x["D"], x["z"], x["delta_bias"]] if optional == "all" else [None, None, None]
    out, last = selective_scan(*args, *opt, return_last_state=True, backend=backend, **kw)
    ref_in = {k: v.detach().double().requires_grad_() for k, v in x.items()}
    ref_args = [ref_in[k] for k in ("u", "delta", "A", "B", "C")]
    ref_opt = [ref_in[k] for k in ("D", "z", "delta_bias")] if optional == "all" else [None] * 3
    ref, ref_last = selective_scan_ref(*ref_args, *ref_opt, return_last_state=True, **kw)
    assert out.dtype == dtype
    assert rel(out, ref) < RTOL[dtype], f"output rel err {rel(out, ref):.2e}"
    assert rel(last, ref_last) < RTOL[dtype], f"state rel err {rel(last, ref_last):.2e}"
    g = torch.randn_like(ref)
    names = ["u", "delta", "A", "B", "C"] + (["D", "z", "delta_bias"] if optional == "all" else [])
    grads = torch.autograd.grad(out, [x[k] for k in names], g.to(dtype))
    ref_grads = torch.autograd.grad(ref, [ref_in[k] for k in names], g)
    for name, got, want in zip(names, grads, ref_grads):
        assert rel(got, want) < GRAD_RTOL[dtype], f"grad {name}: rel err {rel(got, want):.2e}"


def _check_against_float64(x, backend, names=("u", "delta", "A", "B", "C")):
    """Forward, last state and every gradient of selective_scan (no D/z/bias) against the float64 loop."""
    args = [x[k] for k in names]
    out, last = selective_scan(*args, return_last_state=True, backend=backend)
    ref_in = [v.detach().double().requires_grad_() for v in args]
    ref, ref_last = selective_scan_ref(*ref_in, return_last_state=True)
    dtype = out.dtype
    assert rel(out, ref) < RTOL[dtype], f"output rel err {rel(out, ref):.2e}"
    assert rel(last, ref_last) < RTOL[dtype], f"state rel err {rel(last, ref_last):.2e}"
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, args, g.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_in, g)
    for name, got, want in zip(names, grads, ref_grads):
        assert rel(got, want) < GRAD_RTOL[dtype], f"grad {name}: rel err {rel(got, want):.2e}"


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("length", [130, 1568])
def test_large_delta_matches_float64_reference(backend, length):
    """delta up to 5 with A down to -16: a step decays by up to e^-80 and whole chunks underflow to 0. The torch
    scan only multiplies real decays (never exp(-cumsum delta A), which would overflow here), so it must stay
    exact in this range, not only at init-like values."""
    g = torch.Generator().manual_seed(5)
    batch, dim, n = 2, 8, 16
    delta = 5 * torch.rand(batch, dim, length, generator=g, dtype=torch.float64)
    delta[..., ::7] = 5.0                                                       # the top of the range, often
    A = -torch.linspace(1, 16, n, dtype=torch.float64).repeat(dim, 1) * torch.rand(dim, 1, generator=g).add(0.5)
    A[0] = -16.0
    x = {"u": torch.randn(batch, dim, length, generator=g, dtype=torch.float64), "delta": delta, "A": A,
         "B": torch.randn(batch, n, length, generator=g, dtype=torch.float64),
         "C": torch.randn(batch, n, length, generator=g, dtype=torch.float64)}
    x = {k: v.float().requires_grad_() for k, v in x.items()}
    assert (x["delta"].detach()[0, 0] * x["A"].detach()[0, -1]).min() <= -80   # the range the test is about
    _check_against_float64(x, backend)


def test_torch_scan_blocks_match_reference(monkeypatch):
    """On CPU the torch scan works on blocks of batch rows x chunks (every channel) with reused buffers, carrying
    the state forwards and the adjoint backwards between blocks; force each blocking path at test sizes, with a
    length that needs padding, and compare with float64."""
    from msf_scale.ops import _scan_torch
    batch, dim, n, length = 3, 10, 4, 57
    size, chunks = _scan_torch._geometry(length)
    assert size * chunks > length and chunks >= 3                              # padded, several chunks
    per_chunk = size * n * dim
    cpu = torch.device("cpu")
    for block_elems, expect in ((per_chunk, "one chunk of one row"), (2 * per_chunk, "chunks of one row"),
                                (2 * chunks * per_chunk, "whole rows")):
        monkeypatch.setattr(_scan_torch, "BLOCK_ELEMS", block_elems)
        blocks = _scan_torch._blocks(batch, n, dim, size, chunks, cpu)
        rows = {r1 - r0 for r0, r1, _, _ in blocks}
        spans = {k1 - k0 for _, _, k0, k1 in blocks}
        assert len(blocks) > 1
        assert rows == ({2, 1} if expect == "whole rows" else {1})
        assert spans == ({chunks} if expect == "whole rows" else {1} if expect == "one chunk of one row"
                         else {2, 1} if chunks % 2 else {2})
        x = make_inputs(batch, dim, n, length, torch.float32, seed=block_elems)
        _check_against_float64(x, "torch")


def test_torch_scan_reused_buffers_do_not_leak_between_calls():
    """The CPU workspace is reused across calls, shapes and dtypes: results must not depend on what ran before."""
    small = make_inputs(1, 4, 3, 20, torch.float32, seed=1)
    args = [small[k] for k in ("u", "delta", "A", "B", "C")]
    first = selective_scan(*args, backend="torch").detach().clone()
    big = make_inputs(2, 16, 8, 300, torch.float32, seed=2)
    selective_scan(*(big[k] for k in ("u", "delta", "A", "B", "C")), backend="torch").sum().backward()
    wide = make_inputs(1, 4, 3, 20, torch.float64, seed=1)
    selective_scan(*(wide[k] for k in ("u", "delta", "A", "B", "C")), backend="torch")
    assert torch.equal(selective_scan(*args, backend="torch"), first)


def test_reverse_direction_matches_reference():
    """The block scans the flipped sequence for its backward direction: check that path end to end."""
    x = make_inputs(1, 4, 3, 50, torch.float64)
    args = [x[k] for k in ("u", "delta", "A", "B", "C")]
    flip = lambda t: t.flip(-1)
    out = selective_scan(flip(args[0]), flip(args[1]), args[2], flip(args[3]), flip(args[4]), x["D"], flip(x["z"]),
                         x["delta_bias"], True, backend="torch").flip(-1)
    ref = selective_scan_ref(flip(args[0]), flip(args[1]), args[2], flip(args[3]), flip(args[4]), x["D"],
                             flip(x["z"]), x["delta_bias"], True).flip(-1)
    assert rel(out, ref) < 1e-12
    # and it is a different function from the forward scan (so the test above can fail)
    fwd = selective_scan(*args, x["D"], x["z"], x["delta_bias"], True, backend="torch")
    assert rel(fwd, ref) > 1e-3


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_gradcheck(backend):
    x = make_inputs(1, 3, 2, 9, torch.float64)
    args = tuple(x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, delta_softplus=True, backend=backend), args)


def test_bf16_inputs_scan_in_fp32():
    x = make_inputs(1, 4, 4, 33, torch.bfloat16)
    out = selective_scan(*(x[k] for k in ("u", "delta", "A", "B", "C")), backend="torch")
    ref = selective_scan_ref(*(x[k].double() for k in ("u", "delta", "A", "B", "C")))
    assert out.dtype == torch.bfloat16 and rel(out, ref) < 2e-2


def test_backend_selection(monkeypatch):
    x = make_inputs(1, 2, 2, 4, torch.float32)
    args = [x[k] for k in ("u", "delta", "A", "B", "C")]
    with pytest.raises(ValueError, match="unknown selective-scan backend"):
        selective_scan(*args, backend="nope")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        selective_scan(*args, backend="cuda")
    monkeypatch.setenv(scan_mod.ENV_VAR, "ref")
    assert scan_mod.resolve_backend(None, torch.device("cpu")) == "ref"
    assert scan_mod.resolve_backend("auto", torch.device("cpu")) == "ref"     # auto (the model's default) honours it
    assert scan_mod.resolve_backend("torch", torch.device("cpu")) == "torch"  # an explicit backend name wins
    monkeypatch.setenv(scan_mod.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="unknown selective-scan backend 'nope'"):
        scan_mod.resolve_backend("auto", torch.device("cpu"))
    monkeypatch.delenv(scan_mod.ENV_VAR)
    assert scan_mod.resolve_backend("auto", torch.device("cpu")) == "numba"
    assert {"numba", "torch", "ref"} <= set(scan_mod.available_backends())
    # auto on CPU: numba (parallel over rows) once the rows fill the threads, else the torch scan
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    cpu = torch.device("cpu")
    assert [scan_mod.resolve_backend("auto", cpu, batch=b) for b in (1, 3, 4, 16)] == ["torch"] * 2 + ["numba"] * 2
    assert scan_mod.resolve_backend("auto", cpu) == "numba"
    assert scan_mod.resolve_backend("ref", cpu, batch=1) == "ref"
    with pytest.raises(RuntimeError, match="numba' runs on CPU"):
        scan_mod.resolve_backend("numba", torch.device("cuda"))


def test_shape_errors_name_the_expected_shape():
    x = make_inputs(1, 2, 2, 4, torch.float32)
    with pytest.raises(ValueError, match=r"B must be \[batch=1, N=2, L=4\]"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"][..., :3], x["C"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1569, 3137])
def test_cuda_kernel_matches_torch_backend(dtype, length, mamba_ssm_kernel):
    x = make_inputs(2, 384 * 2, 16, length, dtype, device="cuda")
    for k in ("A", "D", "delta_bias"):   # parameters stay fp32 in the model (mamba-ssm requires A in fp32)
        x[k] = x[k].detach().float().requires_grad_()
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    out = selective_scan(*args, delta_softplus=True, backend="cuda")
    ref_in = {k: v.detach().float().requires_grad_() for k, v in x.items()}
    ref = selective_scan(*(ref_in[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")),
                         delta_softplus=True, backend="torch")
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    assert rel(out, ref) < tol, f"output rel err {rel(out, ref):.2e}"
    g = torch.randn_like(ref)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    grads = torch.autograd.grad(out, [x[k] for k in names], g.to(dtype))
    ref_grads = torch.autograd.grad(ref, [ref_in[k] for k in names], g)
    for name, got, want in zip(names, grads, ref_grads):
        assert rel(got, want) < 5 * tol, f"grad {name}: rel err {rel(got, want):.2e}"


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_inputs_are_left_alone_and_output_takes_inplace_ops(backend):
    """A as a transposed view (A.t() contiguous: a tempting in-place target) must be read, never written; the
    output, a view for the torch backend, must take in-place ops like any tensor, gradients included."""
    x = make_inputs(2, 6, 4, 40, torch.float64)
    A = x["A"].detach().t().contiguous().t().requires_grad_()                   # [D, N] with A.t() contiguous
    before = A.detach().clone()
    names = ("u", "delta", "B", "C", "D", "z", "delta_bias")
    call = lambda fn, t, a: fn(t["u"], t["delta"], a, t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True)
    selective_scan(*(x[k] for k in ("u", "delta")), A, x["B"], x["C"], backend=backend)
    y = call(lambda *a: selective_scan(*a, backend=backend), x, A)
    assert torch.equal(A.detach(), before)
    y.mul_(2)                                                                  # in place on the result
    y.sum().backward()
    ref_in = {k: x[k].detach().clone().requires_grad_() for k in names}
    ref_A = before.clone().requires_grad_()
    ref = call(selective_scan_ref, ref_in, ref_A)
    assert rel(y, 2 * ref) < 1e-12
    (2 * ref).sum().backward()
    for name in names:
        assert rel(x[name].grad, ref_in[name].grad) < 1e-10, name
    assert rel(A.grad, ref_A.grad) < 1e-10


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_softplus_threshold_matches_reference(backend):
    """delta + bias around and above 20, where F.softplus (and mamba's kernel) return x with gradient 1."""
    x = make_inputs(1, 8, 4, 30, torch.float64)
    x["delta"] = (19.0 + 3 * torch.rand(1, 8, 30, dtype=torch.float64)).requires_grad_()
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    out = selective_scan(*(x[k] for k in names), True, backend=backend)
    ref_in = {k: x[k].detach().clone().requires_grad_() for k in names}
    ref = selective_scan_ref(*(ref_in[k] for k in names), True)
    assert rel(out, ref) < 1e-12
    g = torch.randn_like(ref)
    for name, got, want in zip(names, torch.autograd.grad(out, [x[k] for k in names], g),
                               torch.autograd.grad(ref, [ref_in[k] for k in names], g)):
        assert rel(got, want) < 1e-12, f"grad {name}: rel err {rel(got, want):.2e}"
