"""The selective scan under torch.compile: one custom forward op and one backward op per call (no graph break),
checked as ops (opcheck: schema, fake shapes, autograd registration), against the float64 loop, and as a whole
tiny model compiled with fullgraph=True, eval and training, against the eager model."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch._dynamo
from test_selective_scan import make_inputs, rel

from msf_scale.models import create_model
from msf_scale.ops import selective_scan, selective_scan_ref

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
OPTIONAL = ("D", "z", "delta_bias")
TOL = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-12, 1e-10)}   # (output, gradient), as test_selective_scan


def _args(x, optional):
    return [x[k] if k not in OPTIONAL or optional == "all" else None for k in NAMES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("optional", ["none", "all"])
def test_opcheck_forward_and_backward_ops(dtype, optional):
    x = make_inputs(2, 6, 4, 37, dtype)
    args = _args(x, optional)
    torch.library.opcheck(torch.ops.msf_scale.selective_scan_fwd.default, (*args, optional == "all", "torch"))
    with torch.no_grad():
        out, _last, states, pre_gate = torch.ops.msf_scale.selective_scan_fwd(*args, optional == "all", "torch")
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.msf_scale.selective_scan_bwd.default,
                          (dout, *[a if a is None else a.detach() for a in args], states, pre_gate,
                           optional == "all", "torch"))


def _graphs_of(fn, *args):
    """Runs fn compiled with fullgraph=True (AOTAutograd, no inductor: fast on CPU); returns its result and the
    FX graphs dynamo produced."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    return compiled(*args), graphs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", [1, 37])
@pytest.mark.parametrize("optional", ["none", "all"])
def test_compiled_scan_matches_float64_reference(dtype, length, optional):
    x = make_inputs(2, 6, 4, length, dtype)
    args = _args(x, optional)
    softplus = optional == "all"
    out, graphs = _graphs_of(lambda *a: selective_scan(*a, delta_softplus=softplus, backend="torch"), *args)
    ref_in = [a if a is None else a.detach().double().requires_grad_() for a in args]
    ref = selective_scan_ref(*ref_in, delta_softplus=softplus)
    tol, grad_tol = TOL[dtype]
    assert out.dtype == dtype and rel(out, ref) < tol, f"output rel err {rel(out, ref):.2e}"
    g = torch.randn_like(ref)
    present = [k for k, a in zip(NAMES, args) if a is not None]
    grads = torch.autograd.grad(out, [x[k] for k in present], g.to(dtype))
    ref_grads = torch.autograd.grad(ref, [a for a in ref_in if a is not None], g)
    for name, got, want in zip(present, grads, ref_grads):
        assert got.dtype == dtype and rel(got, want) < grad_tol, f"grad {name}: rel err {rel(got, want):.2e}"
    fw_graph, bw_graph = (str(g.graph) for g in graphs)   # one forward, one backward (compiled lazily)
    assert "msf_scale.selective_scan_fwd" in fw_graph and "msf_scale.selective_scan_bwd" in bw_graph


def _tiny(device="cpu", scan_backend="torch", variant="msf_mamba", drop_path_rate=0.1):
    torch.manual_seed(0)
    return create_model(variant, size="tiny", num_frames=2, img_size=32, num_classes=4, depth=2, embed_dim=32,
                        drop_path_rate=drop_path_rate, scan_backend=scan_backend, fusion_backend="auto").to(device)


def _compile_vs_eager(model, x, backend, tol, grad_tol, autocast_dtype=None):
    """Compiled (fullgraph) against eager, eval logits then a training step's logits and parameter gradients."""
    amp = (lambda: torch.autocast(x.device.type, dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    model.eval()
    with torch.no_grad(), amp():
        got, want = compiled(x), model(x)
    assert rel(got, want) < tol, f"eval logits rel err {rel(got, want):.2e}"
    model.train()
    grads = []
    for fn in (compiled, model):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)   # the same stochastic-depth draws
        with amp():
            logits = fn(x)
        logits.float().square().sum().backward()
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (got, got_g), (want, want_g) = grads
    torch._dynamo.reset()
    assert rel(got, want) < tol, f"train logits rel err {rel(got, want):.2e}"
    assert got_g.keys() == want_g.keys() and len(want_g) > 0
    for name in want_g:
        assert rel(got_g[name], want_g[name]) < grad_tol, f"grad {name}: rel err {rel(got_g[name], want_g[name]):.2e}"


@pytest.mark.parametrize("variant", ["videomamba", "msf_mamba", "msf_mamba_plus"])
def test_tiny_models_compile_fullgraph_eval_and_train(variant):
    model = _tiny(variant=variant)
    x = torch.randn(2, 3, 2, 32, 32)
    _compile_vs_eager(model, x, "aot_eager", 1e-5, 1e-4)


@pytest.mark.gpu
def test_tiny_msf_mamba_compiles_fullgraph_with_the_cuda_scan_bf16(mamba_ssm_kernel):
    """The mamba-ssm kernel behind the ops, in bf16 autocast, inductor (the real use): against eager. Not run on
    the CPU machine it was written on."""
    # no drop path: inductor draws its own random numbers (unless fallback_random), so masks would differ
    model = _tiny("cuda", scan_backend="cuda", drop_path_rate=0.0)
    x = torch.randn(2, 3, 2, 32, 32, device="cuda")
    _compile_vs_eager(model, x, "inductor", 2e-2, 5e-2, autocast_dtype=torch.bfloat16)


@pytest.mark.gpu
def test_opcheck_cuda_kernel_ops(mamba_ssm_kernel):
    x = make_inputs(2, 8, 4, 37, torch.bfloat16, device="cuda")
    for k in ("A", "D", "delta_bias"):   # mamba-ssm takes the parameters in fp32
        x[k] = x[k].detach().float().requires_grad_()
    args = [x[k] for k in NAMES]
    torch.library.opcheck(torch.ops.msf_scale.selective_scan_fwd.default, (*args, True, "cuda"))
    out, graphs = _graphs_of(lambda *a: selective_scan(*a, delta_softplus=True, backend="cuda"), *args)
    want = selective_scan(*args, delta_softplus=True, backend="cuda")   # eager: SelectiveScanFn
    assert rel(out, want) == 0.0
    g = torch.randn_like(out)
    for name, got, ref in zip(NAMES, torch.autograd.grad(out, args, g), torch.autograd.grad(want, args, g)):
        # the same kernels; dB and dC (and what sums them) accumulate with atomics, so their order can differ
        assert rel(got, ref) < 1e-5, f"grad {name}: rel err {rel(got, ref):.2e}"
