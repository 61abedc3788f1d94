"""AdamW groups, layer-wise decay and the warm-up + cosine schedule (fast, no training)."""
from __future__ import annotations

import math

import pytest
import torch

from msf_scale.config import load_config
from msf_scale.models import create_model
from msf_scale.optim import build_optimizer, build_scheduler, layer_id, lr_factor, param_groups, peak_lr


@pytest.fixture(scope="module")
def model():
    return create_model("msf_mamba", size="tiny", num_classes=5, num_frames=4, img_size=32, patch_size=8,
                        depth=3, embed_dim=32)


def test_no_decay_for_1d_params_and_no_weight_decay(model):
    groups = param_groups(model, weight_decay=0.05)
    names = {n: g["weight_decay"] for g in groups for n in g["names"]}
    params = dict(model.named_parameters())
    assert set(names) == {n for n, p in params.items() if p.requires_grad}
    for n, wd in names.items():
        expected = 0.0 if params[n].ndim <= 1 or n in model.no_weight_decay() else 0.05
        assert wd == expected, n
    assert names["pos_embed"] == 0.0 and names["head.weight"] == 0.05 and names["head.bias"] == 0.0


def test_layer_decay_scales(model):
    depth = model.cfg.depth
    assert layer_id("patch_embed.weight", depth) == 0 and layer_id("cls_token", depth) == 0
    assert layer_id("blocks.0.norm.weight", depth) == 1 and layer_id(f"blocks.{depth - 1}.x", depth) == depth
    assert layer_id("head.weight", depth) == depth + 1 and layer_id("norm_f.weight", depth) == depth + 1
    scale = {n: g["lr_scale"] for g in param_groups(model, 0.05, layer_decay=0.5) for n in g["names"]}
    assert scale["head.weight"] == 1.0
    assert {v for n, v in scale.items() if n.startswith("blocks.2.")} == {0.5}    # last block: one step down
    assert {v for n, v in scale.items() if n.startswith("blocks.0.")} == {0.5 ** depth}
    assert scale["patch_embed.weight"] == 0.5 ** (depth + 1)
    assert {g["lr_scale"] for g in param_groups(model, 0.05)} == {1.0}   # off by default


def test_lr_scales_with_global_batch(model):
    cfg = load_config(["--optim.lr", "4e-4"])
    assert peak_lr(cfg, 256) == pytest.approx(4e-4) and peak_lr(cfg, 1024) == pytest.approx(1.6e-3)
    opt = build_optimizer(model, cfg, global_batch=512)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([8e-4] * len(opt.param_groups))
    assert opt.defaults["betas"] == (0.9, 0.999)


def test_schedule_warmup_then_cosine_to_min_lr(model):
    cfg = load_config(["--epochs", "10", "--schedule.warmup_epochs", "2", "--schedule.min_lr", "1e-5",
                       "--optim.lr", "2.56e-3"])   # peak 1e-3 at global batch 100
    opt = build_optimizer(model, cfg, global_batch=100)
    sched = build_scheduler(opt, cfg, steps_per_epoch=5, global_batch=100)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3 / 10) and lrs[9] == pytest.approx(1e-3)     # 10 warm-up steps
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))                              # cosine decreases
    assert lrs[-1] > 1e-5 and opt.param_groups[0]["lr"] == pytest.approx(1e-5)         # reaches min_lr at the end
    assert lrs[30] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)                        # half-way through the cosine
    assert lrs[20] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi / 4)))


def test_lr_factor_without_warmup():
    assert lr_factor(0, 10, 0, 0.0) == 1.0 and lr_factor(10, 10, 0, 0.1) == pytest.approx(0.1)


def test_weights_decay_only_where_intended(model):
    """One AdamW step with zero gradients moves decayed weights only."""
    cfg = load_config(["--optim.weight_decay", "0.5"])
    opt = build_optimizer(model, cfg, global_batch=256)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    decayed = {n for g in param_groups(model, 0.5) if g["weight_decay"] > 0 for n in g["names"]}
    assert moved == {n for n in decayed if before[n].abs().sum() > 0}
