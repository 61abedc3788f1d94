"""Central-frame-difference (CFD) state fusion, the MCFM's operator, as one function with backends.

For one scale with a depthwise kernel w over a k x k x k window W (SPEC.md, MCFM):

    F(p0) = sum_{p in W} w(p) H(p0 + p)  -  theta * H(p0) * sum_{p in W, p_t != 0} w(p)

i.e. off-centre frames enter as differences from the centre state (for theta = 1), with zero padding at the
grid border. Shapes: h [batch, C, T, H, W]; each kernel [C, 1, k, k, k] (k odd); theta a float or 0-d tensor
(learnable). Returns one fused tensor per kernel, each shaped like h.

Backends (``backend=``; ``auto``, the default, means ``$MSF_SCALE_FUSION_BACKEND`` when set, else on GPU ``gemm`` for
training-sized batches and ``conv`` for small ones (without gradients ``triton``'s forward for windows over 3 x 3 x 3
and, from 384 channels, one clip's 3 x 3 x 3), on CPU ``shift`` for 3 x 3 x 3 windows and ``conv`` otherwise; see
resolve_backend, logged once). A new backend is a name in BACKENDS, a branch in ``_dispatch`` and, if optional, a
lazily imported private module (``_fusion_triton.py``). All but ``ref`` fold the difference term into the kernel's
centre tap (the CFD term only ever touches H(p0), which is never padded), so each scale is one depthwise 'same'
convolution with an adjusted kernel: exact, and theta's gradient comes from autograd through that fold.
    ``conv``  as F.conv3d (cuDNN on GPU)
    ``shift`` as k^3 shifted multiply-adds (CPU: PyTorch's depthwise conv3d backward is slow there)
    ``ref``   :func:`state_fusion_ref`, the equation as written: conv3d minus theta * H * (off-centre weight sum).
    ``triton`` every scale in one Triton launch (``_fusion_triton.py``; CUDA).
    ``gemm``  every scale as batched tensor-core GEMMs on block-Toeplitz bands (``_fusion_gemm.py``; any device).
    ``igemm`` the same products as row-band implicit GEMMs in Triton over padded states (``_fusion_igemm.py``;
              CUDA; by name only: measured 1.5x slower than gemm on the H100, docs/BENCHMARKS.md session 9).
    ``fft``   every scale as a product in the frequency domain, one transform of the states for all of them
              (``_fusion_fft.py``; any device; by name only).
"""
from __future__ import annotations

import importlib.util
import logging
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F

from msf_scale.ops._cfd import cfd_kernel
from msf_scale.ops._choice import requested_backend
from msf_scale.ops._fusion_fft import state_fusion_fft

BACKENDS = ("auto", "conv", "shift", "ref", "triton", "gemm", "igemm", "fft")   # the last four: own modules
ENV_VAR = "MSF_SCALE_FUSION_BACKEND"
_HAS_TRITON = importlib.util.find_spec("triton") is not None   # PyTorch's CUDA wheels ship it; optional on CPU
log = logging.getLogger(__name__)


# Estimates, not measured thresholds: timed were rows 8 (gemm slowest) and 256 (gemm fastest) on a 14 x 14 grid.
GEMM_MIN_ROWS = 64    # T * B: below it the bands' bytes (fixed, whatever the batch) outweigh the GEMMs' gain
GEMM_MAX_GRID = 256   # H * W: the bands grow with its square (C * sum(k) * (H W)^2 values)
# 3 x 3 x 3 alone (msf_mamba) without gradients: triton for T * B <= BATCH1_ROWS (one clip of up to 16 frames; also two
# clips of 8, untimed) from TRITON_3X3_MIN_CHANNELS channels (compiled batch-1 latency, H100, session 19: base 5.91 ->
# 5.59 ms, small 3.02 -> 2.85; tiny's 192 channels 2.12 -> 2.15, so conv there; larger batches and graph replay untimed)
BATCH1_ROWS = 16
TRITON_3X3_MIN_CHANNELS = 384


def resolve_backend(backend: str | None, device: torch.device | None = None, k: int = 3, rows: int | None = None,
                    grid: int | None = None, grad: bool | None = None, channels: int | None = None) -> str:
    """The concrete backend for one kernel of window k on tensors with rows = T * B and grid = H * W. ``auto``:
    on GPU ``gemm`` for training-sized batches (rows >= GEMM_MIN_ROWS, grid <= GEMM_MAX_GRID); for smaller ones
    ``triton`` where no gradient is needed (``grad``; None: torch.is_grad_enabled()) and k > 3, or k = 3 for one clip
    (rows <= BATCH1_ROWS) of at least TRITON_3X3_MIN_CHANNELS channels, else ``conv``; on CPU shifts for 3 x 3 x 3
    only (autograd through 125 or 343 shifted slices costs more than PyTorch's slow depthwise conv3d). Measured on
    the H200 (docs/BENCHMARKS.md, session 7): MCFM + ASWM forward + backward at batch 32, conv 46 ms, triton 15 ms,
    gemm 7.5 ms; at batch 1 gemm is the slowest (its bands do not shrink).
    Batch-1 forward, 3/5/7 + ASWM, on the lent H100 (session 12): triton (one program per channel) 0.12-0.20 ms,
    conv 0.20-0.42 ms, gemm 0.65-1.67 ms, at 192-576 channels."""
    backend = requested_backend(backend, ENV_VAR, BACKENDS, "state-fusion")
    if backend == "auto":
        if device is None or device.type != "cuda":
            return _chosen("shift" if k <= 3 else "conv", "cpu", k)
        if rows is not None and rows >= GEMM_MIN_ROWS and (grid is None or grid <= GEMM_MAX_GRID):
            return _chosen("gemm", "cuda", k)
        # With gradients not triton, though it is faster at batch 1 (H200, session 7): its bf16 GPU check failed
        # (theta's gradient 6% off float64 on a two-scale ASWM case where conv's was 0.8%; a badly conditioned sum,
        # one draw). Its forward is as accurate as conv's, and without autograd it is one op torch.compile traces.
        # Without gradients triton: for the multiscale windows since session 12, for 3 x 3 x 3 alone at batch 1 from
        # 384 channels since session 19 (above).
        one_clip = rows is not None and rows <= BATCH1_ROWS and (channels or 0) >= TRITON_3X3_MIN_CHANNELS
        if ((k > 3 or one_clip) and _HAS_TRITON
                and not (torch.is_grad_enabled() if grad is None else grad)):
            return _chosen("triton", "cuda", k)
        return _chosen("conv", "cuda", k)
    return backend



@lru_cache(maxsize=None)
def _logged(choice: str, device_type: str, k: int) -> None:
    log.info("state_fusion backend for %s tensors, %dx%dx%d windows: %s", device_type, k, k, k, choice)


def _chosen(choice: str, device_type: str, k: int) -> str:
    """`auto`'s choice, logged once per (device, window): the kernel that ran is part of a measurement. Not while
    dynamo traces: a logger call (inside an lru_cache) would break the graph; the eager run logs it."""
    if not torch.compiler.is_compiling():
        _logged(choice, device_type, k)
    return choice


def state_fusion(h: torch.Tensor, kernels: Sequence[torch.Tensor], theta, backend: str | None = "auto"
                 ) -> list[torch.Tensor]:
    _check(h, kernels)
    if torch.jit.is_tracing():   # one named node for fvcore (msf_scale/flops.py counts it), whatever the backend
        theta = theta if isinstance(theta, torch.Tensor) else torch.tensor(float(theta))
        return torch.ops.msf_scale.state_fusion(h, list(kernels), theta, backend or "auto")
    return _dispatch(h, kernels, theta, backend)


def _dispatch(h: torch.Tensor, kernels: Sequence[torch.Tensor], theta, backend: str | None) -> list[torch.Tensor]:
    rows, grid = h.shape[0] * h.shape[2], h.shape[3] * h.shape[4]
    chosen = (resolve_backend(backend, h.device, max(w.shape[-1] for w in kernels), rows, grid, channels=h.shape[1])
              if kernels else None)
    if chosen == "triton":   # all scales at once
        from msf_scale.ops._fusion_triton import state_fusion_triton   # lazy: triton is optional
        return state_fusion_triton(h, kernels, theta)
    if chosen == "gemm":
        from msf_scale.ops._fusion_gemm import state_fusion_gemm
        return state_fusion_gemm(h, kernels, theta)
    if chosen == "igemm":
        from msf_scale.ops._fusion_igemm import state_fusion_igemm   # lazy: triton is optional
        return state_fusion_igemm(h, kernels, theta)
    if chosen == "fft":
        return state_fusion_fft(h, kernels, theta)
    out = []
    for w in kernels:
        name = resolve_backend(backend, h.device, w.shape[-1], rows, grid)
        if name == "ref":
            out.extend(state_fusion_ref(h, [w], theta))
        elif name == "shift":
            out.append(_shift_conv(h, cfd_kernel(w, theta).to(h.dtype)))
        else:
            out.append(F.conv3d(h, cfd_kernel(w, theta).to(h.dtype), padding=w.shape[-1] // 2, groups=h.shape[1]))
    return out


@torch.library.custom_op("msf_scale::state_fusion", mutates_args=())
def _traced_fusion(h: torch.Tensor, kernels: list[torch.Tensor], theta: torch.Tensor, backend: str
                   ) -> list[torch.Tensor]:
    """The CFD fusion as one opaque op, used only under torch.jit tracing: fvcore's tracer records it by name
    (its handle counts one depthwise k^3 multiply-add per output element and kernel). Forward only."""
    return [f.clone() for f in _dispatch(h, kernels, theta, backend)]   # a custom op's outputs may not be views


@_traced_fusion.register_fake   # shapes only: also what runs on meta tensors (FLOP counting without compute)
def _(h, kernels, theta, backend):
    return [torch.empty_like(h) for _ in kernels]


def _shift_conv(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Depthwise 'same' conv3d as k^3 shifted multiply-adds: PyTorch's CPU depthwise conv3d backward runs a
    slow generic path (~35 ms for a [16, 192, 8, 2, 2] state); this costs k^3 cheap elementwise ops instead."""
    k = w.shape[-1]
    r = k // 2
    _, _, t, hh, ww = h.shape
    hp = F.pad(h, (r, r, r, r, r, r))
    out = None
    for i in range(k):
        for j in range(k):
            for l in range(k):
                tap = w[:, 0, i, j, l].view(1, -1, 1, 1, 1)
                term = hp[:, :, i:i + t, j:j + hh, l:l + ww]
                out = term * tap if out is None else torch.addcmul(out, term, tap)
    return out


def state_fusion_ref(h: torch.Tensor, kernels: Sequence[torch.Tensor], theta, backend=None) -> list[torch.Tensor]:
    """The equation term by term, in the input dtype (tests run it in float64)."""
    _check(h, kernels)
    out = []
    for w in kernels:
        k = w.shape[-1]
        agg = F.conv3d(h, w.to(h.dtype), padding=k // 2, groups=h.shape[1])
        off_centre = (w.sum(dim=(-1, -2, -3)) - w[..., k // 2, :, :].sum(dim=(-1, -2))).reshape(1, -1, 1, 1, 1)
        out.append(agg - theta * h * off_centre.to(h.dtype))
    return out


def _check(h: torch.Tensor, kernels: Sequence[torch.Tensor]) -> None:
    if h.dim() != 5:
        raise ValueError(f"h must be [batch, C, T, H, W], got shape {tuple(h.shape)}")
    for w in kernels:
        k = w.shape[-1]
        if tuple(w.shape) != (h.shape[1], 1, k, k, k) or k % 2 == 0:
            raise ValueError(f"each kernel must be [C={h.shape[1]}, 1, k, k, k] with k odd, got {tuple(w.shape)}")
