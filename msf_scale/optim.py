"""AdamW parameter groups (no decay on 1-D params and `no_weight_decay()`, optional layer-wise lr decay) and
the warm-up + cosine schedule, both defined in optimizer steps so that resume needs only the step count."""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from msf_scale.config import RunConfig

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EMBED = ("patch_embed", "cls_token", "cls_pos", "pos_embed", "temporal_pos_embedding")


def layer_id(name: str, depth: int) -> int:
    """0 for embeddings, i + 1 for blocks.i, depth + 1 for the final norm and head (BEiT's layer decay)."""
    m = _BLOCK.search(name)
    if m:
        return int(m.group(1)) + 1
    return 0 if name.split(".")[0] in _EMBED else depth + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Groups keyed by (decay?, layer); each carries `lr_scale` = layer_decay ** (depth + 1 - layer)."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    depth = 1 + max((int(m.group(1)) for n, _ in model.named_parameters() if (m := _BLOCK.search(n))), default=-1)
    groups: dict[tuple[bool, int], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.ndim > 1 and name not in skip
        lid = layer_id(name, depth) if layer_decay < 1.0 else 0
        g = groups.setdefault((decay, lid), {
            "params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - lid) if layer_decay < 1.0 else 1.0})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def peak_lr(cfg: RunConfig, global_batch: int) -> float:
    """optim.lr is per 256 clips, scaled linearly with the global batch (Goyal et al.)."""
    return cfg.optim.lr * global_batch / 256


def build_optimizer(model: nn.Module, cfg: RunConfig, global_batch: int) -> torch.optim.AdamW:
    lr = peak_lr(cfg, global_batch)
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
        del g["names"]  # DeepSpeed copies group keys; names are for inspection only (param_groups())
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.optim.betas, eps=cfg.optim.eps)


def lr_factor(step: int, total: int, warmup: int, floor: float) -> float:
    """Multiplier on the peak lr at optimizer step `step` (0-based): linear warm-up from 1/warmup to 1,
    then a half cosine down to `floor` (= min_lr / peak) at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig, steps_per_epoch: int,
                    global_batch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = cfg.schedule.epochs * steps_per_epoch
    warmup = round(cfg.schedule.warmup_epochs * steps_per_epoch)
    floor = min(1.0, cfg.schedule.min_lr / peak_lr(cfg, global_batch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, floor))
