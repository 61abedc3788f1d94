"""`--model.init` / `msf-scale import`: OpenGVLab/VideoMamba checkpoints (their key names and shapes, built here:
no network) mapped onto our variants, position embeddings resized, head and fusion left at init."""
from __future__ import annotations

import json
import math

import pytest
import torch

from msf_scale.export import load_model
from msf_scale.config import ConfigError
from msf_scale.models import create_model
from msf_scale.weights_import import load_init, main as import_main


def videomamba_state_dict(d: int, depth: int, grid: int, frames: int, classes: int, patch: int = 16,
                          d_state: int = 16, d_conv: int = 4) -> dict[str, torch.Tensor]:
    """The tensors of their VisionMamba (video_sm/models/videomamba.py) with bimamba v2 mixers
    (mamba_ssm/modules/mamba_simple.py): in_proj without bias, conv1d(_b) with bias, x_proj(_b), dt_proj(_b),
    A_log / A_b_log, D / D_b, out_proj; RMSNorm weights; class token first in pos_embed."""
    g = torch.Generator().manual_seed(0)
    e, r = 2 * d, math.ceil(d / 16)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)
    sd = {"patch_embed.proj.weight": rnd(d, 3, 1, patch, patch), "patch_embed.proj.bias": rnd(d),
          "cls_token": rnd(1, 1, d), "pos_embed": rnd(1, 1 + grid * grid, d),
          "temporal_pos_embedding": rnd(1, frames, d), "norm_f.weight": rnd(d),
          "head.weight": rnd(classes, d), "head.bias": rnd(classes)}
    for i in range(depth):
        p = f"layers.{i}.mixer."
        sd[f"layers.{i}.norm.weight"] = rnd(d)
        sd[p + "in_proj.weight"], sd[p + "out_proj.weight"] = rnd(2 * e, d), rnd(d, e)
        for b in ("", "_b"):
            sd[f"{p}conv1d{b}.weight"], sd[f"{p}conv1d{b}.bias"] = rnd(e, 1, d_conv), rnd(e)
            sd[f"{p}x_proj{b}.weight"] = rnd(r + 2 * d_state, e)
            sd[f"{p}dt_proj{b}.weight"], sd[f"{p}dt_proj{b}.bias"] = rnd(e, r), rnd(e)
        sd[p + "A_log"], sd[p + "A_b_log"] = rnd(e, d_state), rnd(e, d_state)
        sd[p + "D"], sd[p + "D_b"] = rnd(e), rnd(e)
    return sd


def _save(tmp_path, sd, name="videomamba.pth"):
    path = tmp_path / name
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, path)   # their checkpoints wrap it so
    return path


def test_same_geometry_loads_every_tensor_of_the_plain_backbone(tmp_path):
    sd = videomamba_state_dict(d=32, depth=2, grid=4, frames=4, classes=5)
    model = create_model("videomamba", size="tiny", embed_dim=32, depth=2, num_classes=5, num_frames=4, img_size=64,
                         class_token=True, pool="cls")
    report = load_init(model, _save(tmp_path, sd))
    assert report.missing == [] and report.unexpected == []
    ours = model.state_dict()
    for i in range(2):
        m = f"blocks.{i}.mixer."
        assert torch.equal(ours[m + "bwd.A_log"], sd[f"layers.{i}.mixer.A_b_log"])
        assert torch.equal(ours[m + "bwd.D"], sd[f"layers.{i}.mixer.D_b"])
        assert torch.equal(ours[m + "bwd.conv1d.weight"], sd[f"layers.{i}.mixer.conv1d_b.weight"])
        assert torch.equal(ours[m + "bwd.x_proj.weight"], sd[f"layers.{i}.mixer.x_proj_b.weight"])
        assert torch.equal(ours[m + "bwd.dt_proj.bias"], sd[f"layers.{i}.mixer.dt_proj_b.bias"])
        assert torch.equal(ours[m + "fwd.dt_proj.weight"], sd[f"layers.{i}.mixer.dt_proj.weight"])
        assert torch.equal(ours[m + "in_proj.weight"], sd[f"layers.{i}.mixer.in_proj.weight"])
        assert torch.equal(ours[f"blocks.{i}.norm.weight"], sd[f"layers.{i}.norm.weight"])
    assert torch.equal(ours["patch_embed.weight"], sd["patch_embed.proj.weight"])
    assert torch.equal(ours["cls_pos"], sd["pos_embed"][:, :1])
    assert torch.equal(ours["pos_embed"], sd["pos_embed"][:, 1:])
    assert torch.equal(ours["temporal_pos_embedding"][:, :, 0], sd["temporal_pos_embedding"])
    assert torch.equal(ours["head.weight"], sd["head.weight"])


def test_other_geometry_resizes_embeddings_keeps_fusion_and_new_head_at_init(tmp_path):
    sd = videomamba_state_dict(d=32, depth=2, grid=14, frames=8, classes=400)   # K400 at 224 px, 8 frames
    sd["pos_embed"][:, 1:] = 0.25   # a constant embedding must stay constant under any resizing
    torch.manual_seed(1)
    model = create_model("msf_mamba", size="tiny", embed_dim=32, depth=2, num_classes=7, num_frames=4, img_size=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_init(model, _save(tmp_path, sd))
    ours = model.state_dict()
    assert ours["pos_embed"].shape == (1, 16, 32) and torch.allclose(ours["pos_embed"], torch.tensor(0.25))
    t = sd["temporal_pos_embedding"]
    assert ours["temporal_pos_embedding"].shape == (1, 4, 1, 32)
    # linear resize 8 -> 4 with align_corners=False: frame j samples at 2j + 0.5, between their frames 2j and 2j+1
    assert torch.allclose(ours["temporal_pos_embedding"][0, :, 0], (t[0, 0::2] + t[0, 1::2]) / 2, atol=1e-6)
    for k in ("head.weight", "head.bias", "blocks.0.fusion.kernels.0", "blocks.1.fusion.kernels.0"):
        assert torch.equal(ours[k], before[k]), k
    assert not ours["blocks.0.fusion.kernels.0"].any()   # zero init: each block starts as VideoMamba's
    assert {"head.weight", "head.bias", "blocks.0.fusion.kernels.0"} <= set(report.missing)
    assert "cls_token" in report.unexpected   # mean pooling, no class token
    assert any("new class count" in n for n in report.notes)
    assert any("14 x 14 -> 4 x 4" in n for n in report.notes) and any("8 -> 4 frames" in n for n in report.notes)
    assert torch.equal(ours["blocks.1.mixer.bwd.A_log"], sd["layers.1.mixer.A_b_log"])
    summary = report.summary("x.pth")
    assert "missing (left at init): blocks.*.fusion.kernels.0, head.bias, head.weight" in summary


def test_wrong_width_or_pickled_code_is_refused(tmp_path):
    model = create_model("msf_mamba", size="tiny", embed_dim=32, depth=2, num_classes=7, num_frames=4, img_size=64)
    with pytest.raises(ConfigError, match="width 48, the model 32"):
        load_init(model, _save(tmp_path, videomamba_state_dict(d=48, depth=2, grid=4, frames=4, classes=7)))
    path = tmp_path / "code.pth"
    torch.save({"model": videomamba_state_dict(d=32, depth=2, grid=4, frames=4, classes=7), "x": ConfigError("x")},
               path)
    with pytest.raises(ConfigError, match="not a weights-only torch checkpoint"):
        load_init(model, path)


@pytest.mark.parametrize("option", [{"stem": "conv"}, {"stem_input": "rgb_diff"}])
def test_their_weights_are_refused_for_another_stem(tmp_path, option):
    model = create_model("msf_mamba", size="tiny", embed_dim=32, depth=2, num_classes=7, num_frames=4, img_size=64,
                         **option)
    with pytest.raises(ConfigError, match="fit the linear patch stem on RGB input"):
        load_init(model, _save(tmp_path, videomamba_state_dict(d=32, depth=2, grid=4, frames=4, classes=7)))


def test_import_command_writes_an_export_and_train_starts_from_it(tmp_path, tiny_argv, capsys):
    import msf_scale.train as train_mod

    pth = _save(tmp_path, videomamba_state_dict(d=32, depth=2, grid=4, frames=8, classes=400, patch=8))
    out = tmp_path / "imported"
    assert import_main([str(pth), "--out", str(out), "--size", "tiny", "--num-classes", "8", "--num-frames", "4",
                        "--img-size", "32", "--arch", "embed_dim=32", "--arch", "depth=2",
                        "--arch", "patch_size=8"]) == 0
    model = load_model(out)
    assert torch.equal(model.state_dict()["blocks.0.mixer.bwd.D"], torch.load(pth)["model"]["module.layers.0.mixer.D_b"])
    assert json.loads((out / "model_config.json").read_text())["imported_from"] == str(pth)
    capsys.readouterr()
    train_mod.main(tiny_argv("--max-steps", "1", "--model.init", str(out / "model.safetensors")))
    printed = capsys.readouterr().out
    assert f"init from {out / 'model.safetensors'}: " in printed and "unexpected (ignored): none" in printed
