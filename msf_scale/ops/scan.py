"""The selective scan (Mamba's S6 recurrence) as one function with interchangeable backends.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t          (per channel d, state n)
    y_t = <C_t, h_t> + D * u_t ;   out_t = y_t * silu(z_t)

Shapes (mamba-ssm's convention, so the CUDA kernel is a drop-in):
    u, delta, z: [batch, D, L]    A: [D, N]    B, C: [batch, N, L]    D, delta_bias: [D]
or grouped, B, C: [batch, G, N, L] with D % G == 0: channel d reads group d // (D/G) (several scans sharing one
call, e.g. both directions of the bidirectional mixer; mamba-ssm's kernel takes groups natively, ``ref`` expands
them per channel, the torch and numba scans run once per group).

Backends, chosen by ``backend=``; ``auto`` (the default) means ``$MSF_SCALE_SCAN_BACKEND`` when set, else the
fastest that works (logged once). Each fast backend is a private module with one ``scan(...)`` of the same
signature (``_scan_torch``, ``_scan_numba``); this module only picks and casts:
    ``cuda``  mamba-ssm's fused CUDA kernel (GPU tensors, ``pip install msf_scale[cuda]``)
    ``numba`` a compiled one-pass CPU kernel (forward and backward), parallel over batch rows
    ``torch`` a chunked parallel scan in plain PyTorch with a hand-written backward (any device; on CPU the
              faster one when the batch has fewer rows than threads)
    ``triton`` ops/_scan_triton.py: tiles of associative scans in Triton (GPU, or CPU under TRITON_INTERPRET=1);
              explicit only (``auto`` does not pick it); reverses groups itself (below)
    ``chunked`` ops/_scan_chunked.py: forward only, for inference: chunks of the sequence in parallel, each walked
              in blocks of steps (Triton; GPU, or CPU under TRITON_INTERPRET=1); ``auto``'s choice on CUDA under
              torch.no_grad for grouped calls at batch 1 (:func:`inference_backend`); reverses
              groups itself, also under torch.compile (one custom op); refuses inputs that need a gradient
    ``ref``   :func:`selective_scan_ref`, a per-step loop in the input dtype: the float64 reference for tests

``reverse_groups=k`` (grouped B/C only) scans the last k groups backwards in time, from t = L - 1 to 0: the
bidirectional mixer's backward direction without flipped copies. The triton kernel reads those channels in
reverse order itself; every other backend gets flipped copies in and flips the output back (same result).
"""
from __future__ import annotations

import logging
from functools import lru_cache

import torch
import torch.nn.functional as F

from msf_scale.ops import _scan_torch
from msf_scale.ops._choice import requested_backend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cuda", "numba", "torch", "triton", "chunked", "ref")
ENV_VAR = "MSF_SCALE_SCAN_BACKEND"


@lru_cache(maxsize=None)
def _mamba_ssm_scan():
    """mamba-ssm's selective_scan_fn, or None when its CUDA extension does not import (e.g. on CPU)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # ImportError, or OSError from a mismatched CUDA build
        log.debug("mamba-ssm unavailable: %s", err)
        return None
    return selective_scan_fn


@lru_cache(maxsize=None)
def _numba_scan():
    """The numba CPU kernel module, or None when numba is not installed."""
    try:
        from msf_scale.ops import _scan_numba
    except ImportError as err:
        log.debug("numba unavailable: %s", err)
        return None
    return _scan_numba


@lru_cache(maxsize=None)
def _triton_scan():
    """The Triton scan module, or None when triton is not installed."""
    try:
        from msf_scale.ops import _scan_triton
    except ImportError as err:
        log.debug("triton unavailable: %s", err)
        return None
    return _scan_triton


@lru_cache(maxsize=None)
def _chunked_scan():
    """The forward-only chunked Triton scan module, or None when triton is not installed."""
    try:
        from msf_scale.ops import _scan_chunked
    except ImportError as err:
        log.debug("triton unavailable: %s", err)
        return None
    return _scan_chunked


def _chunked_module():
    """_chunked_scan() without its cache wrapper while dynamo traces (it would warn on it; the import is a lookup)."""
    return _chunked_scan.__wrapped__() if torch.compiler.is_compiling() else _chunked_scan()


def available_backends() -> list[str]:
    names = ["torch", "ref"]
    if torch.cuda.is_available() and _triton_scan() is not None:
        names.insert(0, "triton")
    if _numba_scan() is not None:
        names.insert(0, "numba")
    if torch.cuda.is_available() and _mamba_ssm_scan() is not None:
        names.insert(0, "cuda")
    return names


@lru_cache(maxsize=None)
def _resolve_auto(device_type: str, rows_fill_threads: bool = True) -> str:
    if device_type == "cuda":
        choice = "cuda" if _mamba_ssm_scan() is not None else "torch"
    elif device_type == "cpu" and rows_fill_threads and _numba_scan() is not None:
        choice = "numba"
    else:
        choice = "torch"
    log.info("selective_scan backend for %s tensors%s: %s", device_type,
             "" if rows_fill_threads else " (fewer batch rows than threads)", choice)
    return choice


def resolve_backend(backend: str | None, device: torch.device, batch: int | None = None) -> str:
    """Turn ``auto``/None into a concrete backend, failing loudly if missing: ``$MSF_SCALE_SCAN_BACKEND`` when
    set (the model's default is ``auto``, so the variable switches every block), else the fastest available.

    On CPU, numba parallelises over batch rows: with at least as many rows as threads it is as fast as the torch
    scan or faster (1.3x at the main job's shape); with fewer (batch-1 latency) the torch scan, which spreads one
    row over the threads, is ~2x faster (docs/BENCHMARKS.md)."""
    backend = requested_backend(backend, ENV_VAR, BACKENDS, "selective-scan")
    if backend == "auto":
        return _resolve_auto(device.type, batch is None or batch >= torch.get_num_threads())
    if backend == "cuda":
        if device.type != "cuda":
            raise RuntimeError("selective_scan backend 'cuda' needs CUDA tensors; use backend='torch' on CPU")
        if _mamba_ssm_scan() is None:
            raise RuntimeError("selective_scan backend 'cuda' needs mamba-ssm: pip install 'msf_scale[cuda]' "
                               "(or mamba-ssm built for your torch/CUDA)")
    if backend == "triton":
        if _triton_scan() is None:
            raise RuntimeError("selective_scan backend 'triton' needs triton: pip install triton")
        _triton_scan().check_device(device)
    if backend == "chunked":
        if _chunked_module() is None:
            raise RuntimeError("selective_scan backend 'chunked' needs triton: pip install triton")
        _chunked_module().check_device(device)
    if backend == "numba":
        if device.type != "cpu":
            raise RuntimeError("selective_scan backend 'numba' runs on CPU tensors; use 'cuda' or 'torch' on GPU")
        if _numba_scan() is None:
            raise RuntimeError("selective_scan backend 'numba' needs numba: pip install numba")
    return backend


def inference_backend(backend: str | None, device: torch.device, shape: tuple[int, int, int], groups: int = 1,
                      d_state: int = 16) -> str | None:
    """``backend`` as given, except that ``auto`` (not overridden by $MSF_SCALE_SCAN_BACKEND) on CUDA with autograd
    off (torch.no_grad / inference_mode) becomes ``chunked`` where it was measured faster than mamba-ssm's kernel:
    batch 1, a grouped call (both directions of the mixer, ``groups`` >= 2), d_state a power of two up to 16 (1.28 /
    1.58 / 1.72x at tiny / small / base width, H100, session 15, docs/BENCHMARKS.md). Larger batches, one-direction
    calls and wider states keep mamba-ssm (untimed). Decided from shapes and the grad mode only, so it holds under
    torch.compile too (the mixer asks before it lays out its inputs)."""
    if torch.is_grad_enabled() or device.type != "cuda" or torch.jit.is_tracing():
        return backend
    if shape[0] != 1 or groups < 2 or d_state > 16 or d_state & (d_state - 1):
        return backend
    if requested_backend(backend, ENV_VAR, BACKENDS, "selective-scan") != "auto" or _chunked_module() is None:
        return backend
    if not torch.compiler.is_compiling():
        _log_inference_choice()
    return "chunked"


@lru_cache(maxsize=None)
def _log_inference_choice() -> None:
    log.info("selective_scan backend for grouped batch-1 inference on CUDA (autograd off): chunked")


def reverses_in_kernel(backend: str | None, device: torch.device, batch: int) -> bool:
    """Whether ``reverse_groups`` costs no flipped copies for this backend (the triton scan reads reversed
    groups backwards itself, and the chunked scan, a custom op, also under compile; under tracing, and under
    compile for the others, every backend takes the flipping path)."""
    if torch.jit.is_tracing():
        return False
    if torch.compiler.is_compiling():   # the name only (selective_scan and the mixer turn an `auto` that means
        # chunked into the name first: inference_backend), and the resolver is cached
        return chunked_requested(backend)
    return resolve_backend(backend, device, batch=batch) in ("triton", "chunked")


def chunked_requested(backend: str | None) -> bool:
    return requested_backend(backend, ENV_VAR, BACKENDS, "selective-scan") == "chunked"


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend: str | None = "auto", reverse_groups: int = 0):
    """Selective scan with optional skip ``D``, gate ``z``, ``delta_bias`` and softplus on delta.

    Returns ``out`` [batch, D, L] in u's dtype, or ``(out, last_state [batch, D, N])`` with return_last_state. The
    ``chunked`` backend writes ``out`` in u's layout: for token-major u (a [batch, L, D] tensor's transposed view, the
    grouped mixer's batch-1 path) a transposed view too, not contiguous.
    ``reverse_groups``: the last k groups of a grouped B/C run backwards in time (their last state is after t = 0).
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    backend = inference_backend(backend, u.device, tuple(u.shape), B.shape[1] if B.dim() == 4 else 1, A.shape[1])
    if reverse_groups:
        groups = B.shape[1] if B.dim() == 4 else 0
        if not 0 < reverse_groups <= groups:
            raise ValueError(f"reverse_groups={reverse_groups} needs grouped B/C with at least that many groups "
                             f"(B is {tuple(B.shape)})")
        if not reverses_in_kernel(backend, u.device, u.shape[0]):
            return _by_flipping(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend,
                                reverse_groups)
    if (torch.compiler.is_compiling() and backend != "ref"   # ref is plain PyTorch: dynamo traces it as is
            and not chunked_requested(backend)):             # chunked: already one custom op
        return _compiled_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend)
    if torch.jit.is_tracing():   # one named node for fvcore (msf_scale/flops.py counts it), whatever the backend
        y, last = torch.ops.msf_scale.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                     backend or "auto")
        return (y, last) if return_last_state else y
    return _dispatch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend,
                     reverse_groups)


def _by_flipping(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend, reverse):
    """reverse_groups for a backend that scans forwards only: the reversed groups' channels (the last
    ``reverse`` of G groups) of u, delta, z and their B, C flipped in time, scanned, and the output flipped back."""
    groups, dim = B.shape[1], u.shape[1]
    split = dim - reverse * (dim // groups)

    def flip(t, axis_split):
        head, tail = t.split([axis_split, t.shape[1] - axis_split], dim=1)
        return torch.cat([head, tail.flip(-1)], dim=1)
    u, delta = flip(u, split), flip(delta, split)
    z = None if z is None else flip(z, split)
    B, C = flip(B, groups - reverse), flip(C, groups - reverse)
    y, last = selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True, backend)
    y = flip(y, split)
    return (y, last) if return_last_state else y


def _dispatch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend, reverse_groups=0):
    name = resolve_backend(backend, u.device, batch=u.shape[0])
    if B.dim() == 4 and name in ("torch", "numba"):   # kernels without groups: one call per group
        y, last = _per_group(lambda *a: _dispatch(*a, delta_softplus, True, name), u, delta, A, B, C, D, z,
                             delta_bias)
        return (y, last) if return_last_state else y
    if name == "cuda":
        return _mamba_ssm_scan()(u, delta, A.float(), B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if name == "chunked":
        y, last = _chunked_module().scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse_groups)
        return (y, last) if return_last_state else y
    if name == "triton":
        y, last = _triton_scan().scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse_groups)
        return (y, last) if return_last_state else y
    dtype_in = u.dtype
    cast = _caster(u)   # bf16/fp16 scan in fp32, as mamba
    kernel = _scan_torch if name == "torch" else _numba_scan()   # one signature: scan(u, ..., delta_softplus)
    y, last = kernel.scan(*map(cast, (u, delta, A, B, C, D, z, delta_bias)), delta_softplus)
    y = y.to(dtype_in)
    return (y, last) if return_last_state else y


def _per_group(scan, u, delta, A, B, C, D, z, delta_bias):
    """A grouped scan (B, C [batch, G, N, L]) as G ungrouped ``scan(u, delta, A, B, C, D, z, delta_bias) -> (y,
    last)`` calls on consecutive blocks of D/G channels; y and last state concatenated back along channels.
    Autograd flows through the slices and the cat."""
    groups = B.shape[1]
    split = lambda t: [None] * groups if t is None else t.chunk(groups, dim=1 if t.dim() == 3 else 0)
    ys, lasts = zip(*(scan(*args) for args in zip(*map(split, (u, delta, A)), B.unbind(1), C.unbind(1),
                                                  *map(split, (D, z, delta_bias)))))
    return torch.cat(ys, dim=1), torch.cat(lasts, dim=1)


@torch.library.custom_op("msf_scale::selective_scan", mutates_args=())
def _traced_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
                 delta_softplus: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan as one opaque op, used only under torch.jit tracing: fvcore's tracer records it by name instead of
    the backend's hundreds of primitive ops (or failing inside its autograd function). Forward only."""
    y, last = _dispatch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True, backend)
    return y.clone(), last.to(_state_dtype(u), copy=True)   # a custom op's outputs may not be views


@_traced_scan.register_fake   # shapes only: also what runs on meta tensors (FLOP counting without compute)
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    return torch.empty_like(u), u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=_state_dtype(u))


# ---- torch.compile: the scan as a forward op and a backward op, so dynamo/AOTAutograd see one opaque node per
# call (no graph break in every block) and training compiles too. Two kernels behind them: mamba-ssm's CUDA
# extension, called as its SelectiveScanFn calls it, and the torch scan's plain forward/backward. Which one is
# decided inside the ops (their real and fake impls run outside dynamo's trace), so `auto` and the environment
# variable are read per call, not baked into a graph; numba (not traceable, no plain backward), triton (its
# kernels are not wrapped for dynamo yet; reverse_groups then flips, see selective_scan) and a `ref` chosen through
# the variable run the torch scan there.
CUDA_CHUNK = 2048   # mamba-ssm's selective_scan.cpp: its saved states x are [b, D, ceil(L / 2048), 2N] float32


def _compiled_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend):
    backend = backend or "auto"
    if B.dim() == 4 and not _kernel_takes_groups(backend, u.device.type):
        # Only mamba-ssm's kernel takes grouped B/C; for the torch kernel the graph gets one op pair per group.
        # Decided at trace time (unlike the kernel choice inside the ops), so the ops' torch path refuses 4-D B.
        y, last = _per_group(lambda *a: _compiled_scan(*a, delta_softplus, True, backend), u, delta, A, B, C, D, z,
                             delta_bias)
        return (y, last) if return_last_state else y
    out, last, _states, _pre_gate = torch.ops.msf_scale.selective_scan_fwd(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend)
    return (out, last) if return_last_state else out


@torch.compiler.assume_constant_result
def _kernel_takes_groups(backend: str, device_type: str) -> bool:
    """Whether the compile ops' kernel for this backend and device is mamba-ssm's (grouped B/C as they are);
    evaluated once at trace time, outside dynamo."""
    return _op_kernel(backend, torch.device(device_type)) == "cuda"


def _op_kernel(backend: str, device: torch.device) -> str:
    """'cuda' (mamba-ssm) or 'torch': the kernel behind the compile ops for this backend name and device. Logged
    once as what runs under compile (`auto`'s eager log would name numba on CPU, which compile does not run)."""
    name = requested_backend(backend, ENV_VAR, BACKENDS, "selective-scan")
    if name == "auto":
        kernel = "cuda" if device.type == "cuda" and _mamba_ssm_scan() is not None else "torch"
    else:
        kernel = "cuda" if resolve_backend(name, device) == "cuda" else "torch"   # raises if 'cuda' is missing
    _log_compiled_kernel(name, device.type, kernel)
    return kernel


@lru_cache(maxsize=None)
def _log_compiled_kernel(name: str, device_type: str, kernel: str) -> None:
    log.info("selective_scan under torch.compile (%s, %s tensors): the %s scan", name, device_type, kernel)


def _no_tensor(like: torch.Tensor) -> torch.Tensor:
    """An op output standing for None (a custom op cannot return an optional tensor)."""
    return like.new_empty(0)


@torch.library.custom_op("msf_scale::selective_scan_fwd", mutates_args=())
def _scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
              delta_softplus: bool, backend: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [b, D, L] in u's dtype, last state [b, D, N], saved states, pre-gate output or empty without z);
    the last two exist only for :func:`_scan_bwd`."""
    if _op_kernel(backend, u.device) == "cuda":
        return _cuda_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    _ungrouped(B)
    cast = _caster(u)
    out_t, last, h_in, y_t = _scan_torch.forward(*map(cast, (u, delta, A, B, C, D, z, delta_bias)), delta_softplus)
    # with z None out_t is y_t: return it once (outputs may not alias), and as the [b, D, L] view eager returns
    return out_t.transpose(1, 2).to(u.dtype), last, h_in, y_t if z is not None else _no_tensor(y_t)


@_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    batch, dim, length = u.shape
    n = A.shape[1]
    if _op_kernel(backend, u.device) == "cuda":
        states = u.new_empty(batch, dim, -(-length // CUDA_CHUNK), 2 * n, dtype=torch.float32)
        last = u.new_empty(batch, dim, n, dtype=torch.float32)
        return torch.empty_like(u, memory_format=torch.contiguous_format), last, states, (
            torch.empty_like(u, memory_format=torch.contiguous_format) if z is not None else _no_tensor(u))
    compute = _state_dtype(u)
    last_shape, states_shape = _scan_torch.state_shapes(u, A)
    time_major = u.new_empty(batch, length, dim, dtype=compute)
    out = u.new_empty(batch, length, dim).transpose(1, 2)
    return (out, u.new_empty(last_shape, dtype=compute), u.new_empty(states_shape, dtype=compute),
            time_major if z is not None else _no_tensor(time_major))


@torch.library.custom_op("msf_scale::selective_scan_bwd", mutates_args=())
def _scan_bwd(dout: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              C: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
              states: torch.Tensor, pre_gate: torch.Tensor, delta_softplus: bool, backend: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                         torch.Tensor, torch.Tensor]:
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), each in its input's dtype; empty for an absent input."""
    if _op_kernel(backend, u.device) == "cuda":
        grads = _cuda_bwd(dout, u, delta, A, B, C, D, z, delta_bias, states, pre_gate, delta_softplus)
    else:
        _ungrouped(B)
        cast = _caster(u)
        grads = _scan_torch.backward(cast(dout).transpose(1, 2), *map(cast, (u, delta, A, B, C)), states,
                                     *map(cast, (D, z)), pre_gate if z is not None else None, cast(delta_bias),
                                     delta_softplus)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    return tuple(_no_tensor(u) if x is None else g.to(x.dtype) for g, x in zip(grads, inputs))


@_scan_bwd.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, states, pre_gate, delta_softplus, backend):
    time_major = _op_kernel(backend, u.device) == "torch"   # its gu, gdelta, gz: [b, D, L] views of [b, L, D]
    grads = []
    for i, x in enumerate((u, delta, A, B, C, D, z, delta_bias)):
        if x is None:
            grads.append(_no_tensor(u))
        elif time_major and i in (0, 1, 6):
            grads.append(x.new_empty(x.shape[0], x.shape[2], x.shape[1]).transpose(1, 2))
        else:
            grads.append(torch.empty_like(x, memory_format=torch.contiguous_format))
    return tuple(grads)


def _ungrouped(B: torch.Tensor) -> None:
    if B.dim() == 4:   # _compiled_scan splits groups at trace time for this kernel: the backend changed since
        raise RuntimeError("grouped B/C reached the torch scan inside a compiled graph traced for mamba-ssm's "
                           "kernel (did $MSF_SCALE_SCAN_BACKEND change?); recompile: torch._dynamo.reset()")


def _scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend = inputs
    _out, _last, states, pre_gate = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states, pre_gate)
    ctx.delta_softplus, ctx.backend = delta_softplus, backend


def _scan_backward(ctx, dout, _dlast, _dstates, _dpre_gate):
    """The gradient of ``out`` only: the last state is not differentiated (as in mamba-ssm and the eager path)."""
    u, delta, A, B, C, D, z, delta_bias, states, pre_gate = ctx.saved_tensors
    grads = torch.ops.msf_scale.selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, states, pre_gate,
                                                   ctx.delta_softplus, ctx.backend)
    present = (u, delta, A, B, C, D, z, delta_bias)
    return (*(None if x is None else g for g, x in zip(grads, present)), None, None)


_scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup_context)


def _caster(u: torch.Tensor):
    """Casts to the torch scan's compute dtype (bf16/fp16 scan in fp32, as mamba), None passing through."""
    compute = _state_dtype(u)
    return lambda t: None if t is None else t.to(compute)


def _cuda_kernel():
    import selective_scan_cuda   # mamba-ssm's extension: present when _op_kernel chose 'cuda'
    return selective_scan_cuda


def _call_cuda(fn, *args):
    """A selective_scan_cuda entry point; newer mamba-ssm builds take one more optional argument (cu_seqlens or
    prev_state) at the end, passed as None."""
    try:
        return fn(*args)
    except TypeError as err:   # pybind's "incompatible function arguments": the longer signature
        if "incompatible function arguments" not in str(err):
            raise
        return fn(*args, None)


def _stride1(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _one_group(t: torch.Tensor) -> torch.Tensor:
    """B or C as the kernel takes it: [b, G, N, L], an ungrouped [b, N, L] as one group."""
    return t[:, None] if t.dim() == 3 else t


def _cuda_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """As SelectiveScanFn.forward: B, C grouped [b, G, N, L]; out (pre-gate) and x (chunk states) saved."""
    u, delta, B, C, z = map(_stride1, (u, delta, B, C, z))
    D = None if D is None else D.contiguous()
    out, x, *rest = _call_cuda(_cuda_kernel().fwd, u, delta, A.float(), _one_group(B), _one_group(C), D, z,
                               delta_bias, delta_softplus)
    last = x[:, :, -1, 1::2].clone()   # (batch, dim, dstate), a copy: outputs may not alias
    if z is None:
        return out.contiguous(), last, x, _no_tensor(out)
    return rest[0].contiguous(), last, x, out.contiguous()


def _cuda_bwd(dout, u, delta, A, B, C, D, z, delta_bias, x, out, delta_softplus):
    """As SelectiveScanFn.backward (mamba-ssm allocates dz; out_z not recomputed)."""
    u, delta, B, C, z, dout = map(_stride1, (u, delta, B, C, z, dout))
    D = None if D is None else D.contiguous()
    du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = _call_cuda(
        _cuda_kernel().bwd, u, delta, A.float(), _one_group(B), _one_group(C), D, z, delta_bias, dout, x,
        out if z is not None else None, None, delta_softplus, False)
    dz = rest[0] if z is not None else None
    dB, dC = (g.squeeze(1) if t.dim() == 3 else g for g, t in ((dB, B), (dC, C)))   # [b, 1, N, L] back to 3-D
    grads = (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)
    return tuple(None if g is None else g.contiguous() for g in grads)


def _state_dtype(u: torch.Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, backend=None):
    """Naive per-step recurrence in the input dtype (float64 in tests). Same signature as :func:`selective_scan`."""
    dtype = u.dtype
    delta = delta + delta_bias[:, None] if delta_bias is not None else delta
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    # B, C per channel: [b, 1, n, L] shared, or grouped [b, G, n, L] -> [b, d, n, L] (channel d reads d // (D/G))
    B, C = (bc[:, None] if bc.dim() == 3 else bc.repeat_interleave(dim // bc.shape[1], dim=1) for bc in (B, C))
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]                                        # [b, d, 1]
        h = torch.exp(dt * A) * h + dt * B[..., t] * u[:, :, t, None]     # [b, d, n]
        ys.append((h * C[..., t]).sum(-1))                                # [b, d]
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    y = y.to(dtype)
    return (y, h) if return_last_state else y


def _check_shapes(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3:
        raise ValueError(f"u must be [batch, D, L], got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be [D={dim}, N], got {tuple(A.shape)}")
    n = A.shape[1]
    grouped = B.dim() == 4
    if grouped and (B.shape[1] == 0 or dim % B.shape[1]):
        raise ValueError(f"B's groups G={B.shape[1]} must divide D={dim} (channel d reads group d // (D/G))")
    want = (batch, B.shape[1], n, length) if grouped else (batch, n, length)
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != want:
            legend = (f"[batch={batch}, G={B.shape[1]}, N={n}, L={length}] (grouped as B)" if grouped
                      else f"[batch={batch}, N={n}, L={length}] (input-dependent) or [batch, G, N, L]")
            raise ValueError(f"{name} must be {legend}, got {tuple(t.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"{name} must be [D={dim}], got {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
