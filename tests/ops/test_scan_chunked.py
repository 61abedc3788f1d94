"""The ``chunked`` selective-scan backend (ops/_scan_chunked.py): forward-only, for inference.

On CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET), in float64 against the
per-group ``selective_scan_ref`` calls of test_scan_triton (reversed groups flipped in and back): the output and the
last state to 1e-12 relative, with one chunk (the batch fills the programs) and with several (a last chunk that ends
past the sequence, chunks of one step), groups reversed or not, a channel block narrower than CONFIG's where a group
is narrow, every optional input present or absent, ungrouped B/C. It refuses inputs that need a gradient. The
mixer's grouped path on it matches the two-call path, eager and under torch.compile (one custom op, no flips).
``auto`` takes it on CUDA with autograd off for grouped batch-1 calls only. On the GPU (marked gpu): bf16 and fp32 against
float64 at the models' length, batch 1 (chunked) and batch 2; the mixer on ``auto`` takes it at batch-1 inference.
"""
from __future__ import annotations

import copy

import pytest
import torch
from test_scan_triton import NAMES, OPTIONAL, inputs, reference
from test_selective_scan import rel

pytest.importorskip("triton")

from msf_scale.models import blocks  # noqa: E402
from msf_scale.models.blocks import BiMamba  # noqa: E402
from msf_scale.ops import _scan_chunked, selective_scan  # noqa: E402
from msf_scale.ops.scan import ENV_VAR, inference_backend  # noqa: E402


@pytest.fixture(params=[0, 2, 4, 8], ids=["per-step", "blocks-2", "blocks-4", "blocks-8"])
def small_blocks(monkeypatch, request):
    """4 channels a program, chunks until 16 programs, chunks at least 2 steps long: interpreter-sized shapes
    with several chunks; the inputs loaded a step at a time, or in blocks of 2, 4 (CONFIG's default) or 8 steps
    (chunks of 3 or 13 steps end in a partial block)."""
    monkeypatch.setattr(_scan_chunked, "CONFIG", {"BD": 4, "warps": 1, "programs": 16, "min_chunk": 2,
                                                  "steps": request.param, "steps_tokens": request.param})


def mixer_pair(backend):
    """(a float64 BiMamba on two ref-scan calls, its copy on one grouped call of ``backend``, an input of 13 steps)."""
    torch.manual_seed(0)
    two_calls = BiMamba(8, d_state=4, expand=2, scan_backend="ref", dtype=torch.float64).eval()
    two_calls.reset_parameters()
    one_call = copy.deepcopy(two_calls)
    one_call.grouped_scan, one_call.scan_backend = True, backend
    return two_calls, one_call, torch.randn(1, 13, 8, dtype=torch.float64)


def check(x, reverse=0, optional=True, softplus=True, tol=1e-12):
    args = [x[k].detach() if k not in OPTIONAL or optional else None for k in NAMES]
    with torch.no_grad():
        y, last = selective_scan(*args, delta_softplus=softplus, return_last_state=True, backend="chunked",
                                 reverse_groups=reverse)
    y_ref, last_ref = reference(x, reverse, optional, softplus)
    assert y.dtype == x["u"].dtype and y.shape == y_ref.shape
    assert rel(y, y_ref) < tol, f"y: {rel(y, y_ref):.2e}"
    assert rel(last, last_ref) < tol, f"last state: {rel(last, last_ref):.2e}"


@pytest.mark.parametrize("batch, length, chunking", [(4, 13, (1, 13)), (1, 13, (4, 4)), (1, 29, (4, 8)),
                                                     (1, 7, (3, 3)), (2, 5, (2, 3))])
@pytest.mark.parametrize("reverse", [0, 1, 2])
def test_matches_ref_float64(small_blocks, batch, length, reverse, chunking):
    """16 channels in blocks of 4: no chunks at batch 4 (16 programs); at batch 1 four chunks, the last ending past
    the sequence (13 = 4 + 4 + 4 + 1 steps) or not (29: 8 + 8 + 8 + 5), or as many as min_chunk allows (7: 3 + 3 + 1);
    at batch 2 two chunks (3 + 2)."""
    x = inputs(batch, 2, 8, 4, length)
    assert _scan_chunked.chunking(batch, 16, length, 4) == chunking
    check(x, reverse)


@pytest.mark.parametrize("optional", [False, True])
@pytest.mark.parametrize("softplus", [False, True])
def test_optional_inputs_and_softplus(small_blocks, optional, softplus):
    check(inputs(1, 2, 4, 4, 11, seed=3), 1, optional, softplus)


def test_ungrouped_and_narrow_groups(small_blocks):
    check(inputs(1, 0, 4, 4, 9))                       # B, C [batch, N, L]
    check(inputs(1, 3, 2, 4, 9, seed=5), 1)            # 2 channels a group: 2 a program, not CONFIG's 4


def test_chunking_at_the_models_shapes():
    """The shipped CONFIG at tiny's batch-1 width (768 channels, 48 blocks: 43 chunks fill 2048 programs), at batch
    32 (1536 programs: 2 chunks) and 64 (none); chunks no shorter than min_chunk (16)."""
    assert _scan_chunked.chunking(1, 768, 1569, 16) == (43, 37)
    assert _scan_chunked.chunking(32, 768, 1569, 16) == (2, 785)
    assert _scan_chunked.chunking(64, 768, 1569, 16) == (1, 1569)
    assert _scan_chunked.chunking(1, 16, 40, 16) == (2, 20)


def test_auto_takes_chunked_for_grouped_batch_1_inference_only(monkeypatch):
    """``auto`` means chunked where it was timed faster: on CUDA with autograd off, batch 1, a grouped call, d_state a
    power of two up to 16; never with autograd on, at batch 2, for one direction, d_state 24 or 32, on CPU, under
    torch.jit tracing (FLOP counting), under an explicit name or one set through the environment variable. Decided
    from shapes: no GPU needed."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    cuda, cpu, tiny = torch.device("cuda"), torch.device("cpu"), (1, 768, 1569)
    with torch.no_grad():
        assert inference_backend("auto", cuda, tiny, 2, 16) == "chunked"
        assert inference_backend(None, cuda, tiny, 2, 8) == "chunked"
        assert inference_backend("auto", cuda, (2, 768, 1569), 2, 16) == "auto"
        assert inference_backend("auto", cuda, (1, 384, 1569), 1, 16) == "auto"
        assert inference_backend("auto", cuda, tiny, 2, 24) == "auto"
        assert inference_backend("auto", cuda, tiny, 2, 32) == "auto"
        assert inference_backend("auto", cpu, tiny, 2, 16) == "auto"
        assert inference_backend("cuda", cuda, tiny, 2, 16) == "cuda"
        seen = []
        torch.jit.trace(lambda t: seen.append(inference_backend("auto", cuda, tiny, 2, 16)) or t * 2,
                        torch.ones(2), check_trace=False)
        assert seen == ["auto"]
        monkeypatch.setenv(ENV_VAR, "cuda")
        assert inference_backend("auto", cuda, tiny, 2, 16) == "auto"   # the variable's cuda, resolved later
        monkeypatch.delenv(ENV_VAR)
    assert inference_backend("auto", cuda, tiny, 2, 16) == "auto"       # autograd on: training


@pytest.mark.parametrize("path", ["selective_scan", "mixer"])
def test_auto_inference_choice_reaches_the_kernel(small_blocks, monkeypatch, path):
    """The wiring, on CPU under the interpreter with inference_backend stubbed to say chunked: selective_scan on
    ``auto`` asks it (u's shape, the groups, d_state) and runs the chunked kernel; the grouped mixer asks it with both
    directions' shape before laying out its inputs, then hands the kernel group 1 reversed; results as the two-call
    path on ref scans."""
    import msf_scale.models.blocks as blocks
    import msf_scale.ops.scan as scan_mod
    asked, launched = [], []
    real = _scan_chunked.scan
    monkeypatch.setattr(_scan_chunked, "scan", lambda *a: launched.append(a[-1]) or real(*a))
    stub = lambda backend, device, shape, groups=1, d_state=16: asked.append((shape, groups, d_state)) or "chunked"
    monkeypatch.setattr(blocks if path == "mixer" else scan_mod, "inference_backend", stub)
    if path == "selective_scan":
        x = inputs(1, 2, 4, 4, 9, seed=7)
        with torch.no_grad():
            y = selective_scan(*(x[k].detach() for k in NAMES), delta_softplus=True, backend="auto")
        y_ref, _ = reference(x, 0, True, True)
        assert asked == [((1, 8, 9), 2, 4)] and launched == [0]
        assert rel(y, y_ref) < 1e-12
        return
    two_calls, one_call, x = mixer_pair("auto")
    with torch.no_grad():
        y, y_ref = one_call(x), two_calls(x)
    assert asked == [((1, 32, 13), 2, 4)] and launched == [1]
    assert rel(y, y_ref) < 1e-12


def test_empty_sequence_and_strided_skip(small_blocks):
    """L = 0: an empty y and the zero state; a D that is a strided view is read as its values."""
    x = inputs(1, 2, 4, 4, 0)
    with torch.no_grad():
        y, last = selective_scan(*(x[k].detach() for k in NAMES), backend="chunked", return_last_state=True)
    assert y.shape == (1, 8, 0) and last.shape == (1, 8, 4) and not last.any()
    x = inputs(1, 2, 4, 4, 9, seed=6)
    x["D"] = torch.stack([x["D"].detach(), torch.zeros_like(x["D"])], dim=1)[:, 0]   # stride 2
    check(x, 1)


def test_refuses_gradients(small_blocks):
    x = inputs(1, 2, 4, 4, 5)
    with pytest.raises(RuntimeError, match="forward-only"):
        selective_scan(*(x[k] for k in NAMES), backend="chunked")


def test_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = inputs(1, 2, 4, 4, 5)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        with torch.no_grad():
            selective_scan(*(x[k] for k in NAMES), backend="chunked")


def test_steps_per_block_follow_the_layout(monkeypatch):
    """Token-major u (channels at unit stride: the mixer's batch-1 path) takes CONFIG's steps_tokens, channel-major u
    (time innermost) its steps; a one-step sequence, whose strides say nothing, counts as channel-major."""
    monkeypatch.setitem(_scan_chunked.CONFIG, "steps", 4)
    monkeypatch.setitem(_scan_chunked.CONFIG, "steps_tokens", 2)
    channels = torch.zeros(1, 8, 13)
    assert _scan_chunked.steps_per_block(channels) == 4
    assert _scan_chunked.steps_per_block(channels.transpose(1, 2).contiguous().transpose(1, 2)) == 2
    assert _scan_chunked.steps_per_block(torch.zeros(1, 8, 1)) == 4


@pytest.mark.parametrize("layout", ["tokens", "channels"])
@pytest.mark.parametrize("compiled", [False, True])
def test_bimamba_grouped_on_chunked_matches_two_calls(small_blocks, monkeypatch, compiled, layout):
    """The mixer's grouped path on the chunked scan (anticausal conv, group 1 reversed in the kernel, no flips),
    eager and under torch.compile (the custom op in the graph, still reversing itself), against its two-call path on
    ref scans (float64, no autograd); in both layouts (blocks.MIXER_INFERENCE_LAYOUT): token-major, the scan reads
    [B, L, 2E] rows through strides (the channel stride 1, also under compile) and writes y in that layout; channel-
    major, u is [B, 2E, L] with time innermost."""
    launched, layouts = [], []
    real, real_launch = _scan_chunked.scan, _scan_chunked._launch

    def launch(u, *a):   # what the kernels get at run time (under compile: after Inductor's layout choices)
        y, last = real_launch(u, *a)
        layouts.append((u.stride(1) == 1, y.stride() == u.stride()))
        return y, last
    monkeypatch.setattr(_scan_chunked, "scan", lambda *a: launched.append(a[-1]) or real(*a))
    monkeypatch.setattr(_scan_chunked, "_launch", launch)
    monkeypatch.setattr(blocks, "MIXER_INFERENCE_LAYOUT", layout)
    two_calls, one_call, x = mixer_pair("chunked")
    with torch.no_grad():
        y_ref = two_calls(x)
        if compiled:
            torch._dynamo.reset()
            y = torch.compile(one_call, fullgraph=True)(x)
        else:
            y = one_call(x)
    assert rel(y, y_ref) < 1e-12
    assert launched == [1], "the mixer did not hand the backward direction to the kernel reversed"
    assert layouts == [(layout == "tokens", True)], "the scan's u or y is not in the layout's order"


def test_default_block_compiles_for_hopper_without_spills():
    """The three kernels at batch 1, tiny's width and the models' length with CONFIG's block and steps, compiled
    for sm_90 on this machine (benchmarks/kernel_resources.py --chunked-scan: Triton's ahead-of-time compile and
    ptxas -v): they compile (the interpreter checks no compiler limit) and spill no registers. Compile-time facts."""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = _scan_chunked.CONFIG
    block = f"{cfg['BD']},{cfg['warps']},{cfg['steps']}"
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "kernel_resources.py"), "--json",
                          "--chunked-scan", block], capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    nc = _scan_chunked.chunking(1, 768, 1569, cfg["BD"])[0]
    assert sorted(r["kernel"] for r in rows) == [f"chunked scan chunk {k} NC={nc} L=1569"
                                                 for k in ("ends", "outputs", "prefix")], rows
    for r in rows:
        assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, r



def test_refuses_sizes_past_int32_offsets():
    """The kernels index with int32: a call whose tensors or outputs reach 2^31 elements fails before allocating or
    launching (expanded views: no memory behind the sizes); one just below runs the check without refusing."""
    big = torch.zeros(1, 1, 1, dtype=torch.float64).expand(64, 2048, 2 ** 15)
    B = torch.zeros(1, 1, 1, 1, dtype=torch.float64).expand(64, 2, 16, 2 ** 15)
    A = -torch.ones(2048, 16, dtype=torch.float64)
    with torch.no_grad(), pytest.raises(ValueError, match="int32"):
        selective_scan(big, big, A, B, B, backend="chunked", reverse_groups=1)
    from msf_scale.ops._scan_chunked import _fits_int32

    u = torch.zeros(1, 1, 1).expand(2, 2 ** 14, 2 ** 15 - 1)               # y: 2^30 - 2^15 elements
    assert _fits_int32(1, 16, u, u) and not _fits_int32(2 ** 10, 2 ** 11, u, u)   # chunk states: 2^31 and more
    meta = torch.empty(0, device="meta")                                       # strides without memory
    assert _fits_int32(1, 1, meta.as_strided((2, 4, 8), (2 ** 30, 1, 4)))     # furthest element 2^30 + 31
    assert not _fits_int32(1, 1, meta.as_strided((3, 4, 8), (2 ** 30, 1, 4)))  # 2^31 + 31

@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["channels", "tokens"])
@pytest.mark.parametrize("steps", [0, 2, 4, 16])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_gpu_matches_float64(monkeypatch, dtype, tol, batch, steps, layout):
    """The models' length (1569) per step and in blocks of 2 (the shipped CONFIG's for token-major inputs), 4 (for
    channel-major ones) or 16 steps, one group reversed, inputs channel-major or token-major (u, delta, B, C as
    views of [batch, L, channels] tensors: the mixer's batch-1 path); A, D, delta_bias fp32 (model parameters); y and
    the last state within the bound relative to float64 on CPU."""
    monkeypatch.setitem(_scan_chunked.CONFIG, "steps", steps)
    monkeypatch.setitem(_scan_chunked.CONFIG, "steps_tokens", steps)
    x = inputs(batch, 2, 64, 16, 1569, dtype, device="cuda")
    for k in ("A", "D", "delta_bias"):
        x[k] = x[k].detach().float()
    args = [x[k].detach() for k in NAMES]
    if layout == "tokens":
        args = [t if t is None or t.dim() < 3 else t.movedim(-1, 1).contiguous().movedim(1, -1) for t in args]
        assert args[0].stride(1) == 1 and _scan_chunked.steps_per_block(args[0]) == steps
    with torch.no_grad():
        y, last = selective_scan(*args, delta_softplus=True, backend="chunked", reverse_groups=1,
                                 return_last_state=True)
    ref_in = {k: v.detach().cpu().double() for k, v in x.items()}
    y_ref, last_ref = reference(ref_in, 1, True, True)
    assert rel(y.cpu(), y_ref) < tol, f"y: {rel(y.cpu(), y_ref):.2e}"
    assert rel(last.cpu(), last_ref) < tol, f"last: {rel(last.cpu(), last_ref):.2e}"


@pytest.mark.gpu
def test_gpu_bimamba_on_auto_takes_chunked_at_batch_1_inference(monkeypatch):
    """The grouped mixer on ``auto`` (tiny's width, the models' length, fp32): under torch.no_grad at batch 1 it runs
    the chunked scan with its backward group reversed in the kernel, matching the torch scan's result; at batch 2
    and with autograd on it does not."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    launched = []
    real = _scan_chunked.scan
    monkeypatch.setattr(_scan_chunked, "scan", lambda *a: launched.append(a[-1]) or real(*a))
    torch.manual_seed(0)
    mixer = BiMamba(192, d_state=16, expand=2, grouped_scan=True, device="cuda").eval()
    mixer.reset_parameters()
    reference_mixer = copy.deepcopy(mixer)
    reference_mixer.scan_backend = "torch"
    x = torch.randn(1, 1569, 192, device="cuda")
    with torch.no_grad():
        y, y_ref = mixer(x), reference_mixer(x)
        assert launched == [1]
        mixer(torch.randn(2, 1569, 192, device="cuda"))
    mixer(x)
    assert launched == [1], "auto took the chunked scan at batch 2 or with autograd on"
    assert rel(y, y_ref) < 1e-4


def test_whole_model_on_chunked_same_logits_in_both_layouts(monkeypatch):
    """A whole two-block msf_mamba_plus (fp32: the models keep their norms in fp32) with grouped mixers on the chunked
    scan, as the inference runners run it at batch 1: the token-major layout (every block's mixer through
    _forward_token_major, the multiscale fusion reading its output) gives the channel-major layout's logits and the
    ref scan's (to fp32 rounding: the GEMMs sum in another order). Eager; the mixer's compiled path is checked above."""
    from msf_scale.models import create_model
    monkeypatch.setattr(_scan_chunked, "CONFIG", {"BD": 4, "warps": 1, "programs": 16, "min_chunk": 2, "steps": 4,
                                                  "steps_tokens": 2})
    torch.manual_seed(0)
    model = create_model("msf_mamba_plus", size="tiny", num_frames=2, img_size=32, patch_size=8, num_classes=3,
                         depth=2, embed_dim=16, grouped_scan=True, scan_backend="ref").eval()
    x = torch.randn(1, 3, 2, 32, 32)
    taken = []
    real = BiMamba._forward_token_major
    monkeypatch.setattr(BiMamba, "_forward_token_major", lambda self, *a: taken.append(1) or real(self, *a))
    with torch.no_grad():
        want = model(x)
        model.set_backends(scan="chunked")
        logits = {}
        for layout in ("channels", "tokens"):
            monkeypatch.setattr(blocks, "MIXER_INFERENCE_LAYOUT", layout)
            logits[layout] = model(x)
    assert len(taken) == 2, "the token-major path did not run in every block"
    for name, got in logits.items():
        assert rel(got, want) < 1e-5, f"{name}: {rel(got, want):.2e}"


def test_token_major_path_at_batch_two_and_through_the_inference_cache(monkeypatch):
    """The token-major path with `chunked` asked for by name at batch 2, and with the inference cache on (as the
    runners set it): its packed parameters (tap-major conv taps, block-diagonal projections) are built once and reused,
    and rebuilt after any parameter changes (one at a time: a key missing one fails); outputs as the two-call path."""
    monkeypatch.setattr(_scan_chunked, "CONFIG", {"BD": 4, "warps": 1, "programs": 16, "min_chunk": 2, "steps": 4,
                                                  "steps_tokens": 2})
    monkeypatch.setattr(blocks, "MIXER_INFERENCE_LAYOUT", "tokens")
    two_calls, one_call, _ = mixer_pair("chunked")
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        assert rel(one_call(x), two_calls(x)) < 1e-12
        one_call.inference_cache = True
        first = one_call._token_major_params(torch.float64)
        assert all(a is b for a, b in zip(one_call._token_major_params(torch.float64), first))
        for name, _ in one_call.named_parameters():
            one_call.get_parameter(name).mul_(1.5)
            two_calls.get_parameter(name).mul_(1.5)
            assert rel(one_call(x), two_calls(x)) < 1e-12, name


def test_token_major_weights_fold_into_constants_under_freezing(monkeypatch):
    """Frozen compiled inference (the runners' default on CUDA) folds the token-major path's weight work (the tap-major
    taps, the block-diagonal projections, built by padding and concatenation) into constants: no kernel of the CPU
    compile pads, concatenates or copies (a zeros-and-scatter build would leave one in every forward)."""
    import re

    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code
    monkeypatch.setattr(blocks, "MIXER_INFERENCE_LAYOUT", "tokens")
    _, one_call, x = mixer_pair("chunked")
    torch._dynamo.reset()
    with torch.no_grad(), inductor_config.patch(freezing=True):
        y, (code, *_) = run_and_get_code(torch.compile(one_call), x)
    torch._dynamo.reset()
    kernels = set(re.findall(r"\b(cpp_fused_\w+)\(", code))
    assert kernels, "no kernel names found in Inductor's code"
    assert not [k for k in kernels if re.search(r"pad|cat|clone|zeros|scatter|copy", k)], kernels
