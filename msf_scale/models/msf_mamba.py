"""MSF-Mamba, MSF-Mamba+ and the plain bidirectional VideoMamba-style baseline, one registry of variant x size.

References: Li et al., "MSF-Mamba: Motion-aware State Fusion Mamba for Efficient Micro-Gesture Recognition"
(arXiv 2510.10478); VideoMamba (Li et al., 2024) for the backbone; Mamba (Gu & Dao, 2023) for the SSM and its
initialisation. Every reading the paper leaves open is a field of :class:`MSFMambaConfig` (SPEC.md marks them).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from msf_scale.catalog import SSM_SIZES as MODEL_SIZES
from msf_scale.catalog import SSM_VARIANTS as VARIANTS
from msf_scale.models._registry import ModelOptionError, register_model
from msf_scale.models.blocks import BiMamba, Block, StateFusion, check_fusion_init
from msf_scale.models.stem import STEM_INPUTS, ConvStem, PatchEmbed, stem_channels, stem_input
from msf_scale.ops.scan import BACKENDS as SCAN_BACKENDS
from msf_scale.ops.state_fusion import BACKENDS as FUSION_BACKENDS


@dataclass
class MSFMambaConfig:
    variant: str = "msf_mamba"
    embed_dim: int = 192
    depth: int = 24
    drop_path_rate: float = 0.1
    num_classes: int = 32
    num_frames: int = 8               # T at the input
    img_size: int = 224
    in_chans: int = 3
    patch_size: int = 16              # [ours] p
    tubelet_size: int = 1             # [ours] frames per token
    stem: str = "patch"               # [ours] "patch": one linear map per patch (VideoMamba); "conv": log2(p) strided
                                      # 3x3 convs + 1x1 (models/stem.py). Measured: docs/BENCHMARKS.md, "Fine motion"
    stem_temporal_kernel: int = 1     # conv stem only: 3 = its filters span neighbouring frames
    stem_input: str = "rgb"           # [ours] "rgb" (the paper's) | "rgb_diff": the stem also sees each sampled frame
                                      # minus the previous one (3 more channels, zero for the first frame)
    # bidirectional SSM ([ours] VideoMamba bimamba v2)
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    dt_rank: int | None = None        # None: ceil(d / 16)
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    dt_init: str = "mamba"            # "mamba" (dt log-uniform) | "videomamba" (their blanket init: bias 0)
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    # MCFM / ASWM
    fusion_scales: tuple[int, ...] | None = None   # None: the variant's ((3,) or (3, 5, 7) or ())
    use_aswm: bool | None = None                   # None: the variant's
    fusion_theta: float = 0.7                      # [ours] CFD strength
    fusion_theta_learnable: bool = False
    fusion_init: str = "zero"         # [ours] "zero": fused states start at 0 (the block starts as the backbone's);
                                      # "uniform": nn.Conv3d's default. Measured: docs/BENCHMARKS.md, "Learnability"
    fusion_blocks: str = "all"        # [ours] "all" | "every_K" | "last_N": which blocks fuse
    fusion_norm: str = "none"         # [ours] "none": H + F joins the residual, the next pre-norm normalises it;
                                      # "branch": norm(H + F) joins it (grads grow ~10x over 32 blocks at init)
    # head and embeddings. [ours, measured] the paper projects "the final feature map" to the logits: we pool it
    # (mean over video tokens) with no class token. VideoMamba's readout (class token first, pool="cls") is kept
    # as an option, but it stayed at chance on the synthetic task where mean pooling reached 99.7% (same data,
    # recipe and steps; docs/BENCHMARKS.md, "Learnability"), and a first-position class token never sees the
    # CFD-fused states directly (it bypasses fusion and reads them only through later blocks' scans).
    class_token: bool = False
    pool: str = "mean"                # "mean" (of the video tokens) | "max" (per channel; the other reading) | "cls" (needs
                                      # class_token)
    head_drop: float = 0.0
    pos_embed_std: float = 0.02
    linear_init_std: float = 0.02
    # execution
    scan_backend: str = "auto"
    grouped_scan: bool = False        # both scan directions as one grouped call (blocks.BiMamba); same result and
                                      # parameters, fewer launches; off: on the H200 no training gain (issue 19)
    fusion_backend: str = "auto"
    grad_checkpointing: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):   # a flag's value reaches here raw: "maybe" must not read as True
            value = getattr(self, f.name)
            if f.type in ("bool", "bool | None") and not (isinstance(value, bool) or value is None and "None" in f.type):
                raise ModelOptionError(f"{f.name} must be true or false, got {value!r}")
        if self.variant not in VARIANTS:
            raise ModelOptionError(f"model.variant: unknown {self.variant!r}; expected one of {sorted(VARIANTS)}")
        scales, aswm = VARIANTS[self.variant]
        self.fusion_scales = tuple(scales if self.fusion_scales is None else self.fusion_scales)
        self.use_aswm = aswm if self.use_aswm is None else self.use_aswm
        if self.img_size % self.patch_size:
            raise ModelOptionError(f"img_size {self.img_size} must be divisible by patch_size {self.patch_size}")
        if self.num_frames % self.tubelet_size:
            raise ModelOptionError(f"num_frames {self.num_frames} must be divisible by tubelet_size "
                                   f"{self.tubelet_size}")
        if any(k % 2 == 0 or k < 1 for k in self.fusion_scales):
            raise ModelOptionError(f"fusion_scales must be odd window sizes, got {self.fusion_scales}")
        if self.stem not in ("patch", "conv"):
            raise ModelOptionError(f"stem must be 'patch' or 'conv', got {self.stem!r}")
        if self.stem == "conv" and self.tubelet_size != 1:
            raise ModelOptionError(f"the conv stem keeps every frame: tubelet_size must be 1, got {self.tubelet_size}")
        if self.dt_init not in ("mamba", "videomamba"):
            raise ModelOptionError(f"dt_init must be 'mamba' or 'videomamba', got {self.dt_init!r}")
        check_fusion_init(self.fusion_init)
        if self.fusion_norm not in ("branch", "none"):
            raise ModelOptionError(f"fusion_norm must be 'branch' or 'none', got {self.fusion_norm!r}")
        if self.pool not in ("cls", "mean", "max") or (self.pool == "cls" and not self.class_token):
            raise ModelOptionError(f"pool must be 'mean', 'max' or 'cls' (needs class_token), got {self.pool!r}")
        if self.stem_input not in STEM_INPUTS:
            raise ModelOptionError(f"stem_input must be 'rgb' or 'rgb_diff', got {self.stem_input!r}")
        for name, known in (("scan_backend", SCAN_BACKENDS), ("fusion_backend", FUSION_BACKENDS)):
            if getattr(self, name).lower() not in known:   # else the first forward would fail, mid-run
                raise ModelOptionError(f"{name} must be one of {known}, got {getattr(self, name)!r}")
        self.fused_block_ids()   # validates fusion_blocks

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.num_frames // self.tubelet_size, self.img_size // self.patch_size,
                self.img_size // self.patch_size)

    def fused_block_ids(self) -> list[int]:
        if not self.fusion_scales:
            return []
        spec = self.fusion_blocks
        if spec == "all":
            return list(range(self.depth))
        kind, _, num = spec.partition("_")
        if kind in ("every", "last") and num.isdigit() and int(num) > 0:
            n = int(num)
            return (list(range(n - 1, self.depth, n)) if kind == "every"
                    else list(range(max(self.depth - n, 0), self.depth)))
        raise ModelOptionError(f"fusion_blocks must be 'all', 'every_K' or 'last_N' (K, N > 0), got {spec!r}")


class MSFMamba(nn.Module):
    """Tubelet embedding -> spatial + temporal position embedding (a first-position class token only with
    ``class_token=True``; off by default) -> bidirectional SSM blocks (with CFD state fusion where configured)
    -> final norm -> mean of the video tokens (or the class token with ``pool="cls"``) -> linear head.
    Input [B, 3, T, H, W]."""

    def __init__(self, cfg: MSFMambaConfig, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        fk = {"device": device, "dtype": dtype}
        d = cfg.embed_dim
        t, gh, gw = cfg.grid
        self.num_prefix = int(cfg.class_token)
        stem_chans = stem_channels(cfg.in_chans, cfg.stem_input)
        if cfg.stem == "conv":
            self.patch_embed = ConvStem(stem_chans, d, cfg.patch_size, cfg.stem_temporal_kernel, **fk)
        else:
            self.patch_embed = PatchEmbed(stem_chans, d, (cfg.tubelet_size, cfg.patch_size, cfg.patch_size), **fk)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d, **fk)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, gh * gw, d, **fk))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, d, **fk)) if cfg.class_token else None
        self.temporal_pos_embedding = nn.Parameter(torch.zeros(1, t, 1, d, **fk))
        fused = set(cfg.fused_block_ids())
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(d, BiMamba(d, cfg.d_state, cfg.expand, cfg.d_conv, cfg.dt_rank, cfg.dt_min, cfg.dt_max,
                             cfg.dt_init_floor, cfg.scan_backend, grouped_scan=cfg.grouped_scan, **fk),
                  StateFusion(d, cfg.fusion_scales, cfg.fusion_theta, cfg.fusion_theta_learnable, cfg.use_aswm,
                              cfg.fusion_backend, cfg.fusion_init, **fk) if i in fused else None,
                  cfg.fusion_norm, cfg.norm_eps, dpr[i], self.num_prefix, **fk)
            for i in range(cfg.depth))
        self.norm_f = nn.RMSNorm(d, eps=cfg.norm_eps, **fk)
        self.head_drop = nn.Dropout(cfg.head_drop)
        self.head = nn.Linear(d, cfg.num_classes, **fk)
        self.grad_checkpointing = cfg.grad_checkpointing
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        cfg = self.cfg
        nn.init.trunc_normal_(self.pos_embed, std=cfg.pos_embed_std)
        if self.cls_pos is not None:
            nn.init.trunc_normal_(self.cls_pos, std=cfg.pos_embed_std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=cfg.linear_init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for blk in self.blocks:   # after the blanket pass: the SSM's own init (A, D, Mamba's dt_proj)
            blk.mixer.reset_parameters(mamba_dt=cfg.dt_init == "mamba")
        for p in self.parameters():   # GPT-2/Mamba: residual output projections shrink with depth
            if getattr(p, "_residual_out", False):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                p.div_(math.sqrt(cfg.depth))

    # --- the model API shared by every variant ---------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        cfg = self.cfg
        expected = (cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size)
        if x.dim() != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected video [B, C, T, H, W] with (C, T, H, W) = {expected}, got {tuple(x.shape)}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, T, H, W] -> normalised tokens [B, prefix + T'H'W', d] (spatial-first order)."""
        self.check_input(x)
        x = self.patch_embed(stem_input(x, self.cfg.stem_input))   # [B, d, T', H', W']
        b, d, t, gh, gw = x.shape
        x = x.permute(0, 2, 3, 4, 1).reshape(b, t, gh * gw, d)
        x = (x + self.pos_embed[:, None] + self.temporal_pos_embedding).reshape(b, t * gh * gw, d)
        if self.cls_token is not None:
            x = torch.cat([(self.cls_token + self.cls_pos).expand(b, -1, -1).to(x.dtype), x], dim=1)
        if self.cfg.residual_in_fp32:
            x = x.float()
        grid = (t, gh, gw)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, grid, use_reentrant=False)
            else:
                x = blk(x, grid)
        return self.norm_f(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pool = self.cfg.pool
        if pool == "cls":
            x = x[:, 0]
        else:
            tokens = x[:, self.num_prefix:]
            x = tokens.amax(dim=1) if pool == "max" else tokens.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_backends(self, scan: str | None = None, fusion: str | None = None) -> None:
        """Switch the op backends of every block in place (e.g. to compare kernels on the same weights)."""
        for blk in self.blocks:
            if scan is not None:
                blk.mixer.scan_backend = scan
            if fusion is not None and blk.fusion is not None:
                blk.fusion.backend = fusion

    def no_weight_decay(self) -> set[str]:
        names = {"pos_embed", "cls_token", "cls_pos", "temporal_pos_embedding"}
        for prefix, module in self.named_modules():   # each block type names its own (A_log, D, a learnable theta)
            names |= {f"{prefix}.{p}" if prefix else p for p in getattr(module, "no_weight_decay_params", ())}
        return {n for n in names if n in dict(self.named_parameters())}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_clip(self) -> int:
        """Forward multiply-accumulates for one clip (MAC = 1 FLOP, fvcore's convention); the scan counts
        9 x L x E x N per direction plus the D skip, as VideoMamba's fvcore handle does (SPEC.md)."""
        cfg = self.cfg
        d, e, n = cfg.embed_dim, cfg.expand * cfg.embed_dim, cfg.d_state
        r = cfg.dt_rank or math.ceil(d / 16)
        t, gh, gw = cfg.grid
        tokens = t * gh * gw
        length = tokens + self.num_prefix
        embed = (self.patch_embed.flops(cfg.num_frames, cfg.img_size, cfg.img_size) if cfg.stem == "conv"
                 else tokens * self.patch_embed.in_channels * cfg.tubelet_size * cfg.patch_size ** 2 * d)
        per_dir = length * (e * cfg.d_conv + e * (r + 2 * n) + r * e + 9 * e * n + e)
        mixer = length * (d * 2 * e + e * d + e) + 2 * per_dir            # in/out proj, gate, two directions
        fusion_one = tokens * d * sum(k ** 3 for k in cfg.fusion_scales)
        if cfg.use_aswm:
            m = len(cfg.fusion_scales)
            fusion_one += tokens * (d * m * m + d * m)                     # 1x1x1 conv + weighted sum
        fusion = fusion_one * len(cfg.fused_block_ids())
        return int(embed + cfg.depth * mixer + fusion + d * cfg.num_classes)


def build_config(variant: str, size: str, **overrides) -> MSFMambaConfig:
    if size not in MODEL_SIZES:
        raise ModelOptionError(f"unknown size {size!r}; expected one of {sorted(MODEL_SIZES)}")
    width, depth, drop_path = MODEL_SIZES[size]
    known = {f.name for f in dataclasses.fields(MSFMambaConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        import difflib
        hints = {u: difflib.get_close_matches(u, known, n=1) for u in unknown}
        raise ModelOptionError("unknown model option(s): " + ", ".join(
            f"{u}" + (f" (did you mean {h[0]}?)" if h else "") for u, h in hints.items()))
    base = {"variant": variant, "embed_dim": width, "depth": depth, "drop_path_rate": drop_path}
    return MSFMambaConfig(**{**base, **overrides})


def _create(variant: str, size: str, device=None, dtype=None, **overrides) -> MSFMamba:
    return MSFMamba(build_config(variant, size, **overrides), device=device, dtype=dtype)


def _register(variant: str, size: str) -> None:
    """`create_model("msf_mamba_tiny")` / `create_model("msf_mamba", size="tiny")`: one entry per catalog pair."""
    def create(**kw) -> MSFMamba:
        return _create(variant, size, **kw)
    create.__name__ = create.__qualname__ = f"{variant}_{size}"
    register_model(create)


for _variant in VARIANTS:
    for _size in MODEL_SIZES:
        _register(_variant, _size)
