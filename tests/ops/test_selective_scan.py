"""The PyTorch scan against a float64 per-step reference: outputs, last state and every gradient."""
import importlib

import pytest
import torch

from msf_scale.ops.selective_scan import selective_scan, selective_scan_ref
scan_mod = importlib.import_module("msf_scale.ops.selective_scan")   # the package re-exports the function under this name

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
    assert scan_mod.resolve_backend("auto", torch.device("cpu")) == "numba"   # an explicit argument wins
    assert {"numba", "torch", "ref"} <= set(scan_mod.available_backends())
    with pytest.raises(RuntimeError, match="numba' runs on CPU"):
        scan_mod.resolve_backend("numba", torch.device("cuda"))


def test_shape_errors_name_the_expected_shape():
    x = make_inputs(1, 2, 2, 4, torch.float32)
    with pytest.raises(ValueError, match=r"B must be \[batch=1, N=2, L=4\]"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"][..., :3], x["C"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1569, 3137])
def test_cuda_kernel_matches_torch_backend(dtype, length):
    pytest.importorskip("mamba_ssm")
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
