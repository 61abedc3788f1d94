"""An independent float64 MSF-Mamba, written from /work/shared/SPEC.md's equations and nothing of the package.

It reads a model's weights (a state dict) and its config, and computes the logits with plain tensor ops and
Python loops: patches cut by reshaping (not a conv), the causal conv as a sum over its taps, the selective scan
step by step in both directions (the backward one on the reversed sequence, reversed back), the two directions
averaged and gated by silu(z), the tokens laid on the T x H' x W' grid in spatial-first order, the CFD fusion
term by term over the window, ASWM as a softmax over scales of a 1x1x1 projection, RMSNorm by its formula, the
mean (or class token) readout and the linear head. Where the package and this file disagree, one of them is
wrong: the tests in this folder say which SPEC line they follow.
"""
from __future__ import annotations

import math

import torch

F64 = torch.float64


def params64(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters (and buffers) as float64 leaves that require grad, keyed by name."""
    out = {n: p.detach().to(F64).clone().requires_grad_() for n, p in model.named_parameters()}
    for n, b in model.named_buffers():
        out.setdefault(n, b.detach().to(F64).clone())
    return out


def fused_blocks(depth: int, spec: str, has_fusion: bool) -> list[int]:
    """SPEC: fusion after every block / every k-th block (blocks k, 2k, ... counted from 1) / the last N blocks."""
    if not has_fusion:
        return []
    if spec == "all":
        return list(range(depth))
    kind, num = spec.split("_")
    n = int(num)
    if kind == "every":
        return [i for i in range(depth) if (i + 1) % n == 0]
    return [i for i in range(depth) if i >= depth - n]


def rms_norm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def silu(x):
    return x / (1 + torch.exp(-x))


def softplus(x):
    return torch.log1p(torch.exp(x))


def causal_conv(x, weight, bias):
    """x [B, E, L], weight [E, 1, K]: y_t = bias + sum_j w_j x_{t-(K-1)+j}, x_s = 0 for s < 0 (Mamba's conv)."""
    b, e, length = x.shape
    k = weight.shape[-1]
    y = bias.view(1, e, 1).expand(b, e, length)
    for j in range(k):
        lag = k - 1 - j                                  # tap j reads x_{t - lag}
        shifted = torch.cat([x.new_zeros(b, e, lag), x[:, :, :length - lag]], dim=-1)
        y = y + weight[:, 0, j].view(1, e, 1) * shifted
    return y


def scan(u, delta, A, B, C, D):
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t ;  y_t = C_t . h_t + D u_t  (u, delta [B, E, L]; B, C [B, N, L])."""
    b, e, length = u.shape
    h = u.new_zeros(b, e, A.shape[1])
    ys = []
    for t in range(length):
        dA = torch.exp(delta[:, :, t, None] * A)
        h = dA * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1) + D * u[:, :, t])
    return torch.stack(ys, dim=-1)


def direction(x, p, pre, d_state):
    """One direction of the mixer on x [B, E, L] in its own scan order."""
    u = silu(causal_conv(x, p[pre + "conv1d.weight"], p[pre + "conv1d.bias"]))
    proj = torch.einsum("bel,re->brl", u, p[pre + "x_proj.weight"])         # [B, R + 2N, L]
    rank = p[pre + "dt_proj.weight"].shape[1]
    dt, Bm, Cm = proj[:, :rank], proj[:, rank:rank + d_state], proj[:, rank + d_state:]
    delta = softplus(torch.einsum("brl,er->bel", dt, p[pre + "dt_proj.weight"]) + p[pre + "dt_proj.bias"][:, None])
    A = -torch.exp(p[pre + "A_log"])
    return scan(u, delta, A, Bm, Cm, p[pre + "D"])


def bimamba(x, p, pre, d_state):
    """x [B, L, d] -> [B, L, d]: shared in_proj to (x, z); forward scan and backward scan (on the reversed
    sequence, reversed back); outputs averaged, gated by silu(z), out_proj."""
    xz = torch.einsum("bld,kd->bkl", x, p[pre + "in_proj.weight"])
    e = xz.shape[1] // 2
    xs, z = xz[:, :e], xz[:, e:]
    y_f = direction(xs, p, pre + "fwd.", d_state)
    rev = torch.arange(xs.shape[-1] - 1, -1, -1, device=xs.device)
    y_b = direction(xs[:, :, rev], p, pre + "bwd.", d_state)[:, :, rev]
    y = (y_f + y_b) / 2 * silu(z)
    return torch.einsum("bel,de->bld", y, p[pre + "out_proj.weight"])


def cfd(h, w, theta):
    """F(p0) = sum_{p in W} w(p) H(p0 + p) - theta H(p0) sum_{p in W, p_t != 0} w(p); zero outside the grid.
    h [B, C, T, H, W], w [C, 1, k, k, k] indexed (t, y, x) with the centre at k // 2."""
    b, c, t, hh, ww = h.shape
    k = w.shape[-1]
    r = k // 2
    out = torch.zeros_like(h)
    off = torch.zeros(c, dtype=h.dtype, device=h.device)
    for dt in range(-r, r + 1):
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                tap = w[:, 0, dt + r, dy + r, dx + r]
                if dt != 0:
                    off = off + tap
                # target positions whose neighbour p0 + p lies inside the grid
                t0, t1 = max(0, -dt), min(t, t - dt)
                y0, y1 = max(0, -dy), min(hh, hh - dy)
                x0, x1 = max(0, -dx), min(ww, ww - dx)
                if t0 >= t1 or y0 >= y1 or x0 >= x1:
                    continue
                src = h[:, :, t0 + dt:t1 + dt, y0 + dy:y1 + dy, x0 + dx:x1 + dx]
                pad = (x0, ww - x1, y0, hh - y1, t0, t - t1)
                out = out + torch.nn.functional.pad(src * tap.view(1, c, 1, 1, 1), pad)
    return out - theta * h * off.view(1, c, 1, 1, 1)


def fusion(tokens, p, pre, cfg, grid):
    """tokens [B, n, d] in spatial-first order -> fused [B, n, d]: CFD per scale, ASWM across scales."""
    b, n, d = tokens.shape
    t, gh, gw = grid
    idx = 0
    grid_h = []
    for ti in range(t):                      # token index = ti * H'W' + yi * W' + xi
        for yi in range(gh):
            for xi in range(gw):
                grid_h.append((ti, yi, xi, idx))
                idx += 1
    h = torch.stack([tokens[:, i] for *_, i in grid_h], dim=-1).reshape(b, d, t, gh, gw)
    theta = p[pre + "theta"]
    fused = [cfd(h, p[f"{pre}kernels.{m}"], theta) for m in range(len(cfg.fusion_scales))]
    if cfg.use_aswm:
        cat = torch.cat(fused, dim=1)                                         # [B, M d, T, H, W]
        logits = torch.einsum("bcthw,mc->bmthw", cat, p[pre + "aswm.weight"][:, :, 0, 0, 0])
        logits = logits + p[pre + "aswm.bias"].view(1, -1, 1, 1, 1)
        alpha = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        alpha = alpha / alpha.sum(dim=1, keepdim=True)
        out = sum(alpha[:, m:m + 1] * fused[m] for m in range(len(fused)))
    else:
        out = fused[0]
    return torch.stack([out[:, :, ti, yi, xi] for ti, yi, xi, _ in grid_h], dim=1)   # back to [B, n, d]


def forward(p: dict[str, torch.Tensor], cfg, video: torch.Tensor) -> torch.Tensor:
    """Logits [B, classes] of the model whose float64 parameters are ``p`` (params64) on ``video`` [B, 3, T, H, W]."""
    x = video.to(F64)
    b, c, frames, hgt, wid = x.shape
    pt, ps = cfg.tubelet_size, cfg.patch_size
    t, gh, gw = frames // pt, hgt // ps, wid // ps
    # tubelet embedding: each (pt x ps x ps x C) patch projected by the Conv3d's weight, as a dot product
    patches = x.reshape(b, c, t, pt, gh, ps, gw, ps).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, t, gh, gw, -1)
    w = p["patch_embed.weight"].reshape(cfg.embed_dim, -1)
    tok = torch.einsum("bthwk,dk->bthwd", patches, w) + p["patch_embed.bias"]
    tok = tok.reshape(b, t, gh * gw, -1) + p["pos_embed"][:, None] + p["temporal_pos_embedding"]
    x = tok.reshape(b, t * gh * gw, -1)                                       # frame 1's tokens, then frame 2's...
    prefix = 0
    if cfg.class_token:
        x = torch.cat([(p["cls_token"] + p["cls_pos"]).expand(b, -1, -1), x], dim=1)
        prefix = 1
    fused = set(fused_blocks(cfg.depth, cfg.fusion_blocks, bool(cfg.fusion_scales)))
    for i in range(cfg.depth):
        pre = f"blocks.{i}."
        h = bimamba(rms_norm(x, p[pre + "norm.weight"], cfg.norm_eps), p, pre + "mixer.", cfg.d_state)
        if i in fused:
            tokens = h[:, prefix:]
            h = torch.cat([h[:, :prefix], tokens + fusion(tokens, p, pre + "fusion.", cfg, (t, gh, gw))], dim=1)
            if cfg.fusion_norm == "branch":
                h = rms_norm(h, p[pre + "fusion_norm.weight"], cfg.norm_eps)
        x = x + h
    x = rms_norm(x, p["norm_f.weight"], cfg.norm_eps)
    pooled = x[:, 0] if cfg.pool == "cls" else x[:, prefix:].mean(dim=1)
    return pooled @ p["head.weight"].t() + p["head.bias"]


def forward_macs(cfg) -> dict[str, int]:
    """Forward multiply-accumulates of one clip, counted layer by layer from the architecture (SPEC's convention:
    a scan of width E, length L, state N costs 9 L E N per direction, plus L E for its D skip). ``dense``: the
    matmuls and convolutions a FLOP counter sees (fusion as a depthwise conv3d); ``elementwise``: the rest."""
    d, e, n, kc = cfg.embed_dim, cfg.expand * cfg.embed_dim, cfg.d_state, cfg.d_conv
    r = cfg.dt_rank or math.ceil(d / 16)
    t, gh, gw = cfg.num_frames // cfg.tubelet_size, cfg.img_size // cfg.patch_size, cfg.img_size // cfg.patch_size
    tokens = t * gh * gw
    length = tokens + int(cfg.class_token)
    dense = tokens * d * cfg.in_chans * cfg.tubelet_size * cfg.patch_size * cfg.patch_size   # tubelet embedding
    elementwise = 0
    for i in range(cfg.depth):
        dense += length * d * 2 * e                      # in_proj -> (x, z)
        for _ in ("forward", "backward"):
            elementwise += length * e * kc               # causal depthwise conv
            dense += length * e * (r + 2 * n)            # x_proj -> (dt, B, C)
            dense += length * r * e                      # dt_proj
            elementwise += 9 * length * e * n            # the selective scan
            elementwise += length * e                    # D skip
        elementwise += length * e                        # silu(z) gate
        dense += length * e * d                          # out_proj
    m = len(cfg.fusion_scales)
    nfused = len(fused_blocks(cfg.depth, cfg.fusion_blocks, bool(cfg.fusion_scales)))
    dense += nfused * sum(tokens * d * k ** 3 for k in cfg.fusion_scales)
    if cfg.use_aswm:
        dense += nfused * tokens * (m * d) * m          # 1x1x1 projection to M logits
        elementwise += nfused * tokens * d * m           # the weighted sum over scales
    dense += d * cfg.num_classes                         # head
    return {"dense": dense, "elementwise": elementwise}
