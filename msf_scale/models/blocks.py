"""Building blocks of MSF-Mamba: bidirectional Mamba mixer, CFD state fusion (MCFM) with adaptive scale
weighting (ASWM), and the residual block that chains them. Equations and our readings: ../shared/SPEC.md."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from msf_scale.models._registry import ModelOptionError
from msf_scale.ops import causal_depthwise_conv1d, selective_scan, state_fusion
from msf_scale.ops.causal_conv1d import anticausal_depthwise_conv1d, conv1d_both_silu_token_major
from msf_scale.ops._choice import env_choice
from msf_scale.ops.scan import chunked_requested, inference_backend
from msf_scale.ops.scan import reverses_in_kernel as scan_reverses_in_kernel
from msf_scale.ops._cfd import cfd_kernel
from msf_scale.ops._fusion_fft import fft_dtype, fused_states_fft, grid_sizes, kernel_spectra, multiscale_fusion_fft
from msf_scale.ops._fusion_gemm import multiscale_fusion_gemm
from msf_scale.ops.state_fusion import resolve_backend

# The grouped mixer's layout on the chunked scan (batch-1 inference, autograd off), read at import from
# $MSF_SCALE_MIXER_LAYOUT: "tokens" (the default) keeps the input projection's [B, L, 2E] through the conv1d, the
# projections and the scan (rows of E or 2E channels: aligned GEMMs, no transposed reads; BiMamba.
# _forward_token_major); "channels" transposes to [B, 2E, L] as training does (rows of L = 1569 elements).
MIXER_INFERENCE_LAYOUT = env_choice("MSF_SCALE_MIXER_LAYOUT", ("tokens", "channels"), "tokens")


def inference_cache_applies(module: nn.Module) -> bool:
    """Whether ``module`` may use its inference cache now: ``inference_cache`` on, autograd off, and neither
    torch.compile nor torch.jit tracing (the one would gain nothing, the other would bake the values in as
    constants)."""
    return (getattr(module, "inference_cache", False) and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


def cached_for_inference(module: nn.Module, slot: str, params, build, *extra_key):
    """``build()``, or its earlier result while the cache applies (inference_cache_applies; msf_scale.inference.
    cache_for_inference turns it on) and none of ``params`` has changed identity, storage or in-place version since
    (``extra_key`` joins the key, e.g. a dtype). Why: at batch 1 every op on the parameters (concatenations, exp, the
    CFD fold) is a kernel launch per forward. Not noticed: writes through ``p.data`` (they bump no version counter).
    Parameters that are inference tensors (a model built under torch.inference_mode) have no version counter: no
    cache. Kept in ``module.__dict__[slot]`` (slots start with ``_inference_``): not a buffer, so no state_dict entry
    and no .to() move."""
    if not inference_cache_applies(module) or any(p.is_inference() for p in params):
        return build()
    key = (*extra_key, *((id(p), p.data_ptr(), p._version) for p in params))
    cached = module.__dict__.get(slot)
    if cached is not None and cached[0] == key:
        return cached[1]
    value = build()
    module.__dict__[slot] = (key, value)
    return value


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescaling the kept ones.

    Under torch.compile the rate is read from a tensor (``rate``, a non-persistent buffer) and the branch from a
    bool (``active``): dynamo guards on a Python float's value, so with every block at its own rate a block compiled
    once for all of them (Accelerate's regional compilation) recompiled per block until dynamo's limit (8) sent the
    rest to eager; a tensor's value is never a guard, with or without dynamic shapes. Eager draws with
    ``bernoulli_(1 - p)`` (the random stream the golden losses record); compiled code with ``rand >= rate``, the op
    that takes a tensor rate, so the two streams differ."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.register_buffer("rate", torch.zeros(()), persistent=False)
        self.p = p

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = float(value)
        self.active = self._p > 0.0
        self._set_rate()

    def _set_rate(self) -> None:
        """`rate` = fp32(p) in place (a compiled forward keeps reading the same buffer); a new tensor where that cannot
        be done: after a cast to another dtype, or for an inference tensor (a build under inference_mode) outside it."""
        rate = self.rate
        if rate.dtype != torch.float32 or (rate.is_inference() and not torch.is_inference_mode_enabled()):
            self.rate = torch.full((), self._p, dtype=torch.float32, device=rate.device)
        else:
            with torch.no_grad():
                rate.fill_(self._p)

    def _apply(self, fn, recurse=True):
        # A model cast with `.half()` / `.bfloat16()` would round the rate (0.1 -> 0.0999 in fp16; msf_scale's own
        # training casts nothing: autocast, DeepSpeed's included) and `to_empty()` leave it unset: the buffer follows
        # the module's device, but holds fp32(p).
        super()._apply(fn, recurse)
        self._set_rate()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # `training` first: in eval torch.compile then guards on nothing else here
        if not self.training or not self.active:
            return x
        shape = (x.shape[0], *([1] * (x.dim() - 1)))
        if torch.compiler.is_compiling():
            rate = self.rate   # fp32 whatever dtype the model was cast to (_apply)
            return x * (torch.rand(shape, device=x.device) >= rate) / (1 - rate)
        return x * x.new_empty(shape).bernoulli_(1 - self._p) / (1 - self._p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class BiMamba(nn.Module):
    """VideoMamba's "bimamba v2" mixer: one shared input projection, then a selective scan per direction with its
    own conv1d / x_proj / dt_proj / A / D; the two outputs are averaged, gated by silu(z) and projected back.

    ``grouped_scan`` computes both directions at once (one conv over 2E channels, batched projections, one grouped
    selective_scan with G=2, as VMamba does): the same parameters and result, fewer kernel launches. Off by default: on
    the H200 it gave no training gain (grouped / separate time 0.98-1.06), 4-11% lower graph latency.
    ``inference_cache`` (off by default): see cached_for_inference."""

    def __init__(self, d_model: int, d_state: int = 16, expand: int = 2, d_conv: int = 4, dt_rank: int | None = None,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4,
                 scan_backend: str = "auto", grouped_scan: bool = False, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.inference_cache = False
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.scan_backend = scan_backend
        self.grouped_scan = grouped_scan
        self.dt_init = (dt_min, dt_max, dt_init_floor)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False, **fk)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False, **fk)
        self.out_proj.weight._residual_out = True           # re-initialised by depth in MSFMamba._init_weights
        self.fwd = _Direction(self.d_inner, d_state, self.dt_rank, d_conv, fk)
        self.bwd = _Direction(self.d_inner, d_state, self.dt_rank, d_conv, fk)

    @torch.no_grad()
    def reset_parameters(self, mamba_dt: bool = True) -> None:
        """The SSM's own init (A, D and, with ``mamba_dt``, Mamba's dt_proj), per direction. MSFMamba calls it
        after its blanket trunc-normal pass over every linear layer, which would overwrite dt_proj otherwise."""
        for direction in (self.fwd, self.bwd):
            direction.reset_parameters(*self.dt_init if mamba_dt else ())

    def forward(self, x: torch.Tensor) -> torch.Tensor:    # x [B, L, d]
        if self.grouped_scan:   # asked once, before any layout is chosen (under compile it must be a name)
            backend = inference_backend(self.scan_backend, x.device, (x.shape[0], 2 * self.d_inner, x.shape[1]), 2,
                                        self.d_state)
            if self._takes_token_major(backend, x):
                return self._forward_token_major(x, backend)
        xs, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)   # [B, E, L] each
        if self.grouped_scan:
            y = self._both_directions(xs, backend)
        else:
            y = self.fwd(xs, self.scan_backend) + self.bwd(xs.flip(-1), self.scan_backend).flip(-1)
        y = 0.5 * y * F.silu(z)                                  # gate once: silu(z) is shared by both directions
        return self.out_proj(y.transpose(1, 2))

    def _both_directions(self, xs: torch.Tensor, backend: str | None) -> torch.Tensor:   # [B, E, L] -> y_f + y_b
        """_Direction.forward for fwd on xs and bwd on xs flipped, as one op of each kernel kind: channels [0, E) are
        the forward direction, [E, 2E) the backward one, and the scan reads B/C group 0 or 1 accordingly."""
        batch, width, length = xs.shape
        conv_weight, conv_bias, x_proj, dt_proj, A, D, delta_bias = self._packed_params()
        # a scan that runs group 1 backwards itself (triton; chunked, auto's choice for batch-1 inference) needs
        # no flipped copies: the backward direction's conv runs backwards in time instead (anticausal) and its
        # output comes back in forward time order
        reverse = int(scan_reverses_in_kernel(backend, xs.device, batch))
        if reverse:
            x = torch.cat([causal_depthwise_conv1d(xs, conv_weight[:width], conv_bias[:width]),
                           anticausal_depthwise_conv1d(xs, conv_weight[width:], conv_bias[width:])], dim=1)
        else:
            x = causal_depthwise_conv1d(torch.cat([xs, xs.flip(-1)], dim=1), conv_weight, conv_bias)  # [B, 2E, L]
        x = F.silu(x)
        # The projections transposed, W @ x per (clip, direction), as bmm (exact in fvcore's count; its einsum and
        # matmul handles miss batch dimensions): dt, B, C and delta come out [B, 2, *, L], time innermost, the layout
        # the scan reads, so neither side transposes a copy (x [B, 2E, L] is read as is)
        def per_clip(w: torch.Tensor) -> torch.Tensor:   # [2, M, K] -> [2B, M, K]: a view at batch 1, else a copy
            w = w.to(x.dtype)                               # of the (small) weights; cast first, not per clip
            return w.expand(batch, *w.shape).reshape(batch * 2, *w.shape[1:])
        dt, B, C = torch.bmm(per_clip(x_proj), x.view(batch * 2, width, length)).view(batch, 2, -1, length).split(
            [self.dt_rank, self.d_state, self.d_state], dim=2)                      # [B, 2, R | N | N, L]
        delta = torch.bmm(per_clip(dt_proj), dt.reshape(batch * 2, self.dt_rank, length))
        delta = delta.view(batch, 2 * width, length)                                # [B, 2E, L]
        y = selective_scan(x, delta, A, B, C, D, None, delta_bias, delta_softplus=True, backend=backend,
                           reverse_groups=reverse)
        y_fwd, y_bwd = y.chunk(2, dim=1)
        return y_fwd + (y_bwd if reverse else y_bwd.flip(-1))

    def _takes_token_major(self, backend: str | None, x: torch.Tensor) -> bool:
        """Whether this forward takes the token-major path: MIXER_INFERENCE_LAYOUT "tokens", autograd off, and the
        grouped scan on the chunked backend reversing group 1 itself: `auto`'s choice at batch 1 (timed there), or
        `chunked` asked for by name at any batch. Not under fvcore's trace: FLOP counts follow the channel-major path,
        whose projections carry no zero blocks."""
        return (MIXER_INFERENCE_LAYOUT == "tokens" and not torch.is_grad_enabled() and not torch.jit.is_tracing()
                and chunked_requested(backend) and scan_reverses_in_kernel(backend, x.device, x.shape[0]))

    def _forward_token_major(self, x: torch.Tensor, backend: str | None) -> torch.Tensor:
        """forward's grouped path with every tensor [B, L, channels], as the input projection leaves them: the conv1d
        along axis 1, the two directions' x_proj (and dt_proj) as one GEMM each on block-diagonal weights (their zero
        blocks double those two GEMMs' small FLOPs), the scan reading u, delta, B and C through strides and writing y
        in u's layout. Why: with L = 1569 every time-innermost row is unaligned (cuBLAS fell back to a 2-element-aligned
        CUTLASS kernel, 14 us a block at base) and the conv read the projection transposed; here every row is E, 2E
        or P (a multiple of 8) elements long. The same values as the channel-major path (float64 tests)."""
        e, r, n = self.d_inner, self.dt_rank, self.d_state
        xz = self.in_proj(x)                                                    # [B, L, 2E]: x | z
        xs, z = xz[..., :e], xz[..., e:]
        conv_taps, conv_bias, x_proj, dt_proj, A, D, delta_bias = self._token_major_params(xz.dtype)
        u = conv1d_both_silu_token_major(xs, conv_taps, conv_bias)            # [B, L, 2E]: forward | backward
        proj = F.linear(u, x_proj)                          # [B, L, P]: dt_f, dt_b | B_f, B_b | C_f, C_b | zeros
        delta = F.linear(proj[..., :2 * r], dt_proj)                           # [B, L, 2E]

        def per_group(cols: int) -> torch.Tensor:          # proj's [B, L, 2N] block at cols -> [B, 2, N, L], a view
            return proj[..., cols:cols + 2 * n].unflatten(-1, (2, n)).permute(0, 2, 3, 1)
        y = selective_scan(u.transpose(1, 2), delta.transpose(1, 2), A, per_group(2 * r), per_group(2 * r + 2 * n),
                           D, None, delta_bias, delta_softplus=True, backend=backend, reverse_groups=1)
        y = y.transpose(1, 2)                                                   # [B, L, 2E] (u's layout)
        return self.out_proj(0.5 * (y[..., :e] + y[..., e:]) * F.silu(z))

    def _token_major_params(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """_packed_params with the conv1d's taps tap-major [K, 2E] (as ops/_conv1d_triton reads them) and the
        projections block-diagonal over the two directions, in ``dtype`` (the activations'; cast once, not per
        forward): x_proj [P, 2E] (rows dt_f, dt_b, B_f, B_b, C_f, C_b, then zero rows up to P, 2R + 4N rounded up to a
        multiple of 8) and dt_proj [2E, 2R]. Built by zero padding (F.pad), not from a zeros tensor: Inductor's
        freezing folds it into constants then (it folds nothing downstream of a tensor constructor). Cached for
        inference like _packed_params (per dtype)."""
        conv_weight, conv_bias, x_proj, dt_proj, A, D, delta_bias = self._packed_params()
        e, r, n = self.d_inner, self.dt_rank, self.d_state
        rows = 2 * r + 4 * n
        params = [d.weight for d in (self.fwd.x_proj, self.bwd.x_proj, self.fwd.dt_proj, self.bwd.dt_proj,
                                     self.fwd.conv1d, self.bwd.conv1d)]

        def build():
            def side(w, g):   # w [k, E] -> [k, 2E], in direction g's columns
                return F.pad(w, (0, e) if g == 0 else (e, 0))
            blocks = [side(x_proj[g, lo:hi], g) for lo, hi in ((0, r), (r, r + n), (r + n, r + 2 * n)) for g in (0, 1)]
            x_blk = F.pad(torch.cat(blocks), (0, 0, 0, -rows % 8))
            dt_blk = torch.cat([F.pad(dt_proj[0], (0, r)), F.pad(dt_proj[1], (r, 0))])
            return conv_weight[:, 0, :].t().contiguous(), x_blk.to(dtype), dt_blk.to(dtype)
        conv_taps, x_blk, dt_blk = cached_for_inference(self, "_inference_token_major", params, build, dtype)
        return conv_taps, conv_bias, x_blk, dt_blk, A, D, delta_bias

    def _packed_params(self) -> tuple[torch.Tensor, ...]:
        """Both directions' parameters side by side (conv weight [2E, 1, K] and bias, x_proj [2, R + 2N, E], dt_proj
        [2, E, R], A = -exp(A_log) [2E, N], D, delta_bias): seven concatenations and an exp per block and forward.
        Cached for inference (cached_for_inference): at batch 1 they are ~a third of a grouped block's launches."""
        f, b = self.fwd, self.bwd
        params = [p for d in (f, b) for p in (d.conv1d.weight, d.conv1d.bias, d.x_proj.weight, d.dt_proj.weight,
                                              d.A_log, d.D, d.dt_proj.bias)]
        return cached_for_inference(self, "_inference_packed", params, lambda: (
            torch.cat([f.conv1d.weight, b.conv1d.weight]), torch.cat([f.conv1d.bias, b.conv1d.bias]),
            torch.stack([f.x_proj.weight, b.x_proj.weight]), torch.stack([f.dt_proj.weight, b.dt_proj.weight]),
            -torch.exp(torch.cat([f.A_log, b.A_log]).float()),
            torch.cat([f.D, b.D]).float(), torch.cat([f.dt_proj.bias, b.dt_proj.bias]).float()))


class _Direction(nn.Module):
    """Per-direction parameters and the causal conv -> projections -> selective scan path."""

    no_weight_decay_params = ("A_log", "D")   # a class attribute: copy.deepcopy keeps it (a Parameter's attrs not)

    def __init__(self, d_inner: int, d_state: int, dt_rank: int, d_conv: int, fk: dict):
        super().__init__()
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True, **fk)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False, **fk)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True, **fk)
        self.inference_cache = False   # see cached_for_inference
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state, device=fk["device"], dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(d_inner, device=fk["device"], dtype=torch.float32))
        self.dt_rank, self.d_state = dt_rank, d_state

    def reset_parameters(self, *dt_range: float) -> None:
        """A = -(1..N) per channel (A_log = log(1..N)), D = 1; with ``dt_range`` = (dt_min, dt_max, floor) also
        Mamba's dt init: weight uniform in +-rank^-0.5, bias = softplus^-1(dt), dt log-uniform in [min, max]."""
        n = self.A_log.shape[1]
        self.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).expand_as(self.A_log))
        self.D.fill_(1.0)
        if dt_range:
            dt_min, dt_max, floor = dt_range
            bound = self.dt_proj.in_features ** -0.5
            nn.init.uniform_(self.dt_proj.weight, -bound, bound)
            dt = torch.exp(torch.rand(self.dt_proj.out_features) * (math.log(dt_max) - math.log(dt_min))
                           + math.log(dt_min)).clamp(min=floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x: torch.Tensor, backend: str) -> torch.Tensor:   # x [B, E, L] -> y [B, E, L]
        x = F.silu(causal_depthwise_conv1d(x, self.conv1d.weight, self.conv1d.bias))
        # W @ x per clip (bmm, exact in fvcore's count): dt, B, C and delta come out [B, *, L], time innermost as the
        # scan reads them, with no transposing copy of an activation on either side (BiMamba._both_directions); the
        # weights are cast to x's dtype before they are broadcast over the clips (autocast would copy them per clip)
        batch = x.shape[0]
        dt, B, C = torch.bmm(self.x_proj.weight.to(x.dtype).expand(batch, -1, -1), x).split(
            [self.dt_rank, self.d_state, self.d_state], dim=1)                      # [B, R | N | N, L]
        delta = torch.bmm(self.dt_proj.weight.to(x.dtype).expand(batch, -1, -1), dt)   # [B, E, L]; bias: delta_bias
        A = cached_for_inference(self, "_inference_A", [self.A_log], lambda: -torch.exp(self.A_log.float()))
        return selective_scan(x, delta, A, B, C, self.D.float(), None, self.dt_proj.bias.float(),
                              delta_softplus=True, backend=backend)


FUSION_INITS = ("zero", "uniform")   # StateFusion.reset_parameters says what each means


def check_fusion_init(init: str) -> None:
    """The one check of a fusion init name (the model config runs it too: a videomamba has no StateFusion)."""
    if init not in FUSION_INITS:
        raise ModelOptionError(f"fusion_init must be 'zero' or 'uniform', got {init!r}")


class StateFusion(nn.Module):
    """MCFM + ASWM: CFD fusion of the SSM states over k x k x k windows (one depthwise kernel per scale), then a
    softmax over scales of a 1x1x1 conv on the concatenated fused states weights them at every position."""

    no_weight_decay_params = ("theta",)   # when learnable (a buffer otherwise)

    def __init__(self, dim: int, scales: tuple[int, ...], theta: float, theta_learnable: bool, use_aswm: bool,
                 backend: str = "auto", init: str = "zero", device=None, dtype=None):
        super().__init__()
        check_fusion_init(init)
        self.init = init
        self.inference_cache = False   # see cached_for_inference
        if use_aswm and len(scales) < 2:
            raise ModelOptionError(f"ASWM weights several scales; got fusion_scales={scales}")
        self.scales = tuple(scales)
        self.backend = backend
        self.kernels = nn.ParameterList(
            nn.Parameter(torch.empty(dim, 1, k, k, k, device=device, dtype=dtype)) for k in scales)
        theta_t = torch.tensor(float(theta), device=device)
        if theta_learnable:
            self.theta = nn.Parameter(theta_t)
        else:
            self.register_buffer("theta", theta_t, persistent=False)
        self.aswm = nn.Conv3d(dim * len(scales), len(scales), 1, device=device, dtype=dtype) if use_aswm else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``zero``: F = 0 at init, so the block starts as the plain backbone's and learns how much to fuse (the
        gradient of a kernel tap is the correlation of the output gradient with the shifted states: non-zero).
        ``uniform``: nn.Conv3d's default, +-1/sqrt(k^3); measured to learn slower (docs/BENCHMARKS.md)."""
        for w in self.kernels:
            if self.init == "zero":
                nn.init.zeros_(w)
            else:
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if self.aswm is not None:   # near-uniform scale weights at init
            nn.init.trunc_normal_(self.aswm.weight, std=0.02)
            nn.init.zeros_(self.aswm.bias)

    def scale_weights(self, fused: list[torch.Tensor]) -> torch.Tensor:
        """alpha [B, M, T, H, W]: positive, summing to one over the M scales at every position."""
        logits = self.aswm(torch.cat(fused, dim=1))
        return torch.softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=1)

    def folded_kernels(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """Every scale's kernel with the CFD term folded in (ops._cfd.cfd_kernel), in ``dtype``: what each fast backend
        computes per call (the fold's ~8 small ops per scale). Cached for inference (cached_for_inference), which is
        when forward uses it."""
        kernels = list(self.kernels)
        return cached_for_inference(self, "_inference_folded", kernels + [self.theta],
                                    lambda: [cfd_kernel(w, self.theta).to(dtype) for w in kernels], dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:      # h [B, C, T, H, W] -> fused [B, C, T, H, W]
        # list(): dynamo in torch 2.11 cannot unpack a ParameterList with * (NotImplementedError under compile)
        own = list(self.kernels)
        chosen = None if torch.jit.is_tracing() else resolve_backend(   # tracing (FLOP counting): the named op
            self.backend, h.device, max(self.scales), h.shape[0] * h.shape[2], h.shape[3] * h.shape[4],
            channels=h.shape[1])
        if chosen == "fft":   # the kernels' spectra from the unrounded kernels, cached for inference (per grid size)
            sizes = grid_sizes(h.shape, self.scales)
            spectra = cached_for_inference(self, "_inference_spectra", own + [self.theta],
                                           lambda: kernel_spectra(own, self.theta, sizes, fft_dtype(h)), h.dtype, sizes)
            if self.aswm is None:
                return fused_states_fft(h, own, self.theta, spectra)[0].to(h.dtype)
            return multiscale_fusion_fft(h, own, self.theta, self.aswm.weight, self.aswm.bias, spectra=spectra)
        kernels, theta = own, self.theta   # the other backends take the kernels folded (cached for inference)
        if inference_cache_applies(self):
            kernels, theta = self.folded_kernels(h.dtype), 0.0   # theta 0.0: the backends fold nothing more
        if self.aswm is not None and chosen is not None:
            if chosen == "gemm":
                return multiscale_fusion_gemm(h, kernels, theta, self.aswm.weight, self.aswm.bias)
            if chosen == "triton" and not torch.is_grad_enabled():   # scales + ASWM in one forward-only op
                from msf_scale.ops._fusion_triton import multiscale_fusion_triton, pack_kernels, supported
                if not supported(h, kernels):   # more than three windows, a grid too wide: state_fusion's fallback
                    return self._weighted(state_fusion(h, kernels, theta, backend=self.backend), h.dtype)
                packed = cached_for_inference(self, "_inference_packed", own + [self.theta],
                                              lambda: pack_kernels(own, self.theta, h.shape[1], h.dtype), h.dtype)
                return multiscale_fusion_triton(h, kernels, theta, self.aswm.weight, self.aswm.bias, packed=packed)
        fused = state_fusion(h, kernels, theta, backend=self.backend)
        if self.aswm is None:
            return fused[0]
        return self._weighted(fused, h.dtype)

    def _weighted(self, fused: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """sum_m alpha_m * F_m, the ASWM's output."""
        alpha = self.scale_weights(fused).to(dtype)
        return sum(alpha[:, m:m + 1] * f for m, f in enumerate(fused))


class Block(nn.Module):
    """Pre-norm residual block: x + drop_path(fuse(mixer(norm(x)))). The fusion (if any) adds the CFD-fused
    states to the SSM's output H on the video grid (class token bypasses it); `fusion_norm="branch"` then
    normalises the fused stream before it joins the residual ([ours]: SPEC's "followed by a norm")."""

    def __init__(self, dim: int, mixer: BiMamba, fusion: StateFusion | None, fusion_norm: str, norm_eps: float,
                 drop_path: float, num_prefix: int = 1, device=None, dtype=None):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=norm_eps, device=device, dtype=dtype)
        self.mixer = mixer
        self.fusion = fusion
        self.fusion_norm = (nn.RMSNorm(dim, eps=norm_eps, device=device, dtype=dtype)
                            if fusion is not None and fusion_norm == "branch" else None)
        self.drop_path = DropPath(drop_path)
        self.num_prefix = num_prefix

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        h = self.mixer(self.norm(x))                                # H: [B, L, d]
        if self.fusion is not None:
            prefix, tokens = h[:, :self.num_prefix], h[:, self.num_prefix:]
            b, n, d = tokens.shape
            states = tokens.transpose(1, 2).reshape(b, d, *grid)      # spatial-first order -> [B, d, T, H', W']
            fused = self.fusion(states).reshape(b, d, n).transpose(1, 2)
            h = torch.cat([prefix, tokens + fused], dim=1)
            if self.fusion_norm is not None:
                h = self.fusion_norm(h)
        return x + self.drop_path(h)
