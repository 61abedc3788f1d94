"""Grouped selective scan (B, C [batch, G, N, L]; channel d reads group d // (D/G)) against G separate ungrouped
float64 calls, on every backend and under torch.compile; and the bidirectional mixer's grouped path (both
directions in one scan call) against its two-call path on the same weights."""
from __future__ import annotations

import copy

import pytest
import torch
from test_compile_ops import _graphs_of
from test_selective_scan import make_inputs, rel

from msf_scale.flops import scan_flop_jit
from msf_scale.models.blocks import BiMamba
from msf_scale.ops import scan as scan_mod
from msf_scale.ops import selective_scan, selective_scan_ref

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
OPTIONAL = ("D", "z", "delta_bias")


def grouped_inputs(groups, dtype=torch.float64, batch=2, dim=8, n=4, length=13, seed=0, device="cpu"):
    """make_inputs with B, C grouped: [batch, G, N, L]."""
    x = make_inputs(batch, dim, n, length, dtype, device=device, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for k in ("B", "C"):
        x[k] = torch.randn(batch, groups, n, length, generator=g, dtype=torch.float64).to(device, dtype)
        x[k].requires_grad_()
    return x


def _args(x, optional):
    return [x[k] if k not in OPTIONAL or optional else None for k in NAMES]


def reference_by_group(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """G ungrouped float64 ref calls, written out here (not the op's own per-group helper)."""
    groups = B.shape[1]
    width = u.shape[1] // groups
    ys, lasts = [], []
    for g in range(groups):
        ch = slice(g * width, (g + 1) * width)
        y, last = selective_scan_ref(u[:, ch], delta[:, ch], A[ch], B[:, g], C[:, g],
                                     None if D is None else D[ch], None if z is None else z[:, ch],
                                     None if delta_bias is None else delta_bias[ch], delta_softplus, True)
        ys.append(y)
        lasts.append(last)
    return torch.cat(ys, dim=1), torch.cat(lasts, dim=1)


def _check_grads(out, args, ref, ref_in, tol):
    g = torch.randn_like(ref)
    present = [(k, a, r) for k, a, r in zip(NAMES, args, ref_in) if a is not None]
    grads = torch.autograd.grad(out, [a for _, a, _ in present], g.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, [r for _, _, r in present], g)
    for (name, _, _), got, want in zip(present, grads, ref_grads):
        assert got.shape == want.shape and rel(got, want) < tol, f"grad {name}: rel err {rel(got, want):.2e}"


@pytest.mark.parametrize("backend", ["ref", "torch", "numba"])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("optional", [False, True])
def test_grouped_scan_matches_separate_float64_calls(backend, groups, optional):
    if backend == "numba" and scan_mod._numba_scan() is None:
        pytest.skip("numba not installed")
    args = _args(grouped_inputs(groups), optional)
    out, last = selective_scan(*args, delta_softplus=optional, return_last_state=True, backend=backend)
    ref_in = [a if a is None else a.detach().clone().requires_grad_() for a in args]
    ref, ref_last = reference_by_group(*ref_in, optional)
    assert rel(out, ref) < 1e-12, f"output rel err {rel(out, ref):.2e}"
    assert rel(last, ref_last) < 1e-12, f"state rel err {rel(last, ref_last):.2e}"
    _check_grads(out, args, ref, ref_in, 1e-10)


def test_grouped_shape_errors():
    x = grouped_inputs(4, dim=6)   # 6 channels in 4 groups
    with pytest.raises(ValueError, match=r"groups G=4 must divide D=6"):
        selective_scan(*_args(x, False))
    x = grouped_inputs(2)
    for bad in (x["B"][:, :, None], x["B"][:, 0, 0]):   # 5-D, 2-D
        with pytest.raises(ValueError, match=r"B must be \[batch=2"):
            selective_scan(x["u"], x["delta"], x["A"], bad, x["C"])
    with pytest.raises(ValueError, match=r"C must be \[batch=2, G=2, N=4, L=13\] \(grouped as B\)"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"][:, 0])   # C ungrouped with B grouped


def _mixer_pair(backend):
    """A float64 BiMamba (weights perturbed away from their structured init) and its grouped copy."""
    torch.manual_seed(0)
    separate = BiMamba(16, d_state=4, dt_rank=3, scan_backend=backend).double()
    separate.reset_parameters()
    with torch.no_grad():
        for p in separate.parameters():
            p.add_(0.1 * torch.randn_like(p))
    grouped = copy.deepcopy(separate)
    grouped.grouped_scan = True
    return separate, grouped


@pytest.mark.parametrize("backend", ["ref", "torch", "numba"])
def test_bimamba_grouped_matches_separate(backend):
    if backend == "numba" and scan_mod._numba_scan() is None:
        pytest.skip("numba not installed")
    separate, grouped = _mixer_pair(backend)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    g = torch.randn(2, 11, 16, dtype=torch.float64)
    want, got = separate(x), grouped(x)
    assert rel(got, want) < 1e-12, f"output rel err {rel(got, want):.2e}"
    want.backward(g)
    got.backward(g)
    want_g = dict(separate.named_parameters())
    for name, p in grouped.named_parameters():
        assert rel(p.grad, want_g[name].grad) < 1e-12, f"grad {name}: rel err {rel(p.grad, want_g[name].grad):.2e}"


@pytest.mark.parametrize("backend", ["torch", "ref"])
def test_compiled_grouped_scan_matches_separate_float64_calls(backend):
    """fullgraph, AOTAutograd without inductor; for the torch kernel the groups become one op pair each."""
    groups = 2
    args = _args(grouped_inputs(groups), True)
    out, graphs = _graphs_of(lambda *a: selective_scan(*a, delta_softplus=True, backend=backend), *args)
    ref_in = [a.detach().clone().requires_grad_() for a in args]
    ref, _ = reference_by_group(*ref_in, True)
    assert rel(out, ref) < 1e-12, f"output rel err {rel(out, ref):.2e}"
    _check_grads(out, args, ref, ref_in, 1e-10)
    if backend == "torch":
        fw_graph, bw_graph = (str(g.graph) for g in graphs)
        assert fw_graph.count("msf_scale.selective_scan_fwd") == groups
        assert bw_graph.count("msf_scale.selective_scan_bwd") == groups


def test_traced_grouped_scan_is_one_op_counted_by_flops():
    """fvcore's path (torch.jit.trace): one msf_scale::selective_scan node; the FLOP handle reads D from u."""
    args = _args(grouped_inputs(2), True)
    trace = torch.jit.trace(lambda *a: selective_scan(*a, delta_softplus=True, backend="torch"),
                            tuple(a.detach() for a in args))
    nodes = [n for n in trace.graph.nodes() if n.kind() == "msf_scale::selective_scan"]
    assert len(nodes) == 1
    batch, dim, length = args[0].shape
    assert scan_flop_jit(list(nodes[0].inputs()), list(nodes[0].outputs())) == 9 * batch * length * dim * 4 + (
        2 * batch * dim * length)


@pytest.mark.gpu
def test_grouped_cuda_kernel_and_bimamba_on_gpu(mamba_ssm_kernel):
    """mamba-ssm's kernel with G=2, eager and through the compile ops (opcheck: the fake shapes of 4-D dB, dC),
    against the torch scan in fp32 (the bounds of test_cuda_kernel_matches_torch_backend); the mixer grouped vs
    separate in bf16 autocast (the bounds of the GPU compile test)."""
    args = _args(grouped_inputs(2, torch.float32, batch=2, dim=128, n=16, length=1569, device="cuda"), True)
    torch.library.opcheck(torch.ops.msf_scale.selective_scan_fwd.default, (*args, True, "cuda"))
    g = torch.randn_like(args[0])

    def run(fn):
        leaves = [a.detach().clone().requires_grad_() for a in args]
        out, last = fn(*leaves, delta_softplus=True, return_last_state=True)
        return out, last, torch.autograd.grad(out, leaves, g)

    want = run(lambda *a, **kw: selective_scan(*a, **kw, backend="torch"))
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a, **kw: selective_scan(*a, **kw, backend="cuda"), fullgraph=True,
                             backend="aot_eager")
    for how, fn in (("eager", lambda *a, **kw: selective_scan(*a, **kw, backend="cuda")), ("compiled", compiled)):
        out, last, grads = run(fn)
        assert rel(out, want[0]) < 1e-3, f"{how} output rel err {rel(out, want[0]):.2e}"
        assert rel(last, want[1]) < 1e-3, f"{how} state rel err {rel(last, want[1]):.2e}"
        for name, got, ref in zip(NAMES, grads, want[2]):
            assert got.shape == ref.shape and rel(got, ref) < 5e-3, f"{how} grad {name}: rel err {rel(got, ref):.2e}"
    torch._dynamo.reset()

    separate, grouped = (m.float().cuda() for m in _mixer_pair("cuda"))
    x = torch.randn(4, 1569, 16, device="cuda")
    gy = torch.randn_like(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want_y, got_y = separate(x), grouped(x)
    assert rel(got_y, want_y) < 2e-2, f"output rel err {rel(got_y, want_y):.2e}"
    want_y.float().backward(gy)
    got_y.float().backward(gy)
    want_g = dict(separate.named_parameters())
    for name, p in grouped.named_parameters():
        assert rel(p.grad, want_g[name].grad) < 5e-2, f"grad {name}: rel err {rel(p.grad, want_g[name].grad):.2e}"


def test_model_config_reaches_every_mixer():
    """`--model.arch.grouped_scan true` (MSFMambaConfig.grouped_scan) switches every block's mixer, same logits."""
    from msf_scale.models import create_model

    kw = dict(num_classes=4, num_frames=4, img_size=32, embed_dim=32, depth=2)
    torch.manual_seed(0)
    separate = create_model("msf_mamba_tiny", **kw)
    grouped = create_model("msf_mamba_tiny", grouped_scan=True, **kw)
    grouped.load_state_dict(separate.state_dict())
    assert all(blk.mixer.grouped_scan for blk in grouped.blocks)
    assert not any(blk.mixer.grouped_scan for blk in separate.blocks)
    x = torch.randn(2, 3, 4, 32, 32)
    torch.testing.assert_close(grouped(x), separate(x), rtol=1e-5, atol=1e-6)


def test_packed_params_are_reused_at_inference_and_follow_the_weights():
    """With inference_cache on and without autograd the grouped mixer packs both directions' parameters once (the
    same tensors on the next call) and repacks after any change to a parameter (in place, load_state_dict): outputs
    equal a fresh mixer's; with autograd it packs every call, so gradients reach the parameters."""
    separate, grouped = _mixer_pair("torch")
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    with torch.no_grad():
        assert grouped._packed_params()[0] is not grouped._packed_params()[0]   # off unless asked for
        grouped.inference_cache = True
        first = grouped._packed_params()
        assert all(a is b for a, b in zip(grouped._packed_params(), first))
        assert rel(grouped(x), separate(x)) < 1e-12
        separate.inference_cache = separate.fwd.inference_cache = separate.bwd.inference_cache = True   # A cached
        separate(x)
        for name, _ in grouped.named_parameters():   # one at a time: a key that misses one parameter fails here
            grouped.get_parameter(name).mul_(1.5)
            separate.get_parameter(name).mul_(1.5)
            want = copy.deepcopy(separate)
            want.inference_cache = want.fwd.inference_cache = want.bwd.inference_cache = False
            assert rel(grouped(x), want(x)) < 1e-12, name
            assert rel(separate(x), want(x)) < 1e-12, name
        fresh = copy.deepcopy(separate)
        for p in fresh.parameters():
            p.add_(0.05)
        grouped.load_state_dict(fresh.state_dict())
        assert rel(grouped(x), fresh(x)) < 1e-12
    assert not any(a is b for a, b in zip(grouped._packed_params(), first))
    grouped(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in grouped.parameters())


def test_grouped_mixer_compiles_whole_at_inference():
    """With the cache on, under torch.compile the packing is traced (no cache, no side effect): fullgraph, the
    eager output."""
    separate, grouped = _mixer_pair("torch")
    grouped.inference_cache = True
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(grouped, fullgraph=True, backend="aot_eager")(x)
        assert rel(got, separate(x)) < 1e-12


def test_traced_mixer_reads_the_parameters_not_the_cache():
    """torch.jit.trace (legacy export) under no_grad with the cache on: the trace keeps the parameters as inputs
    (the cache would bake them in as constants), so a later weight change reaches the traced mixer."""
    separate, grouped = _mixer_pair("torch")
    grouped.inference_cache = True
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    with torch.no_grad():
        grouped(x)
        traced = torch.jit.trace(grouped, x, check_trace=False)
        for p, q in zip(grouped.parameters(), separate.parameters()):
            p.mul_(1.25)
            q.mul_(1.25)
        assert rel(traced(x), separate(x)) < 1e-12


def test_a_model_built_in_inference_mode_runs_without_the_cache():
    """Parameters created under torch.inference_mode are inference tensors (no version counter): no cache, no
    error, the same output."""
    with torch.inference_mode():
        separate, grouped = _mixer_pair("torch")
        grouped.inference_cache = True
        x = torch.randn(2, 11, 16, dtype=torch.float64)
        assert rel(grouped(x), separate(x)) < 1e-12
        assert "_inference_packed" not in grouped.__dict__
