"""How the DeepSpeed config is assembled from the run config and the launcher's environment (no launch)."""
from __future__ import annotations

import json

import pytest
import torch

from msf_scale.config import load_config
from msf_scale.distributed import deepspeed_dict, resolve_grad_accum

_LAUNCH_ENV = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
               "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for k in _LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)


def test_stage_zero_means_no_deepspeed():
    assert deepspeed_dict(load_config([]), 1) is None


def test_run_config_fills_the_deepspeed_config():
    cfg = load_config(["--dist.zero_stage", "3", "--train.batch_size", "6", "--optim.clip_grad", "0.5"])
    ds = deepspeed_dict(cfg, 4)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True   # export after ZeRO-3
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (6, 4, 0.5)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and ds["bf16"] == {"enabled": False}


def test_launcher_config_enables_deepspeed_and_flag_overrides_stage(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    assert deepspeed_dict(load_config([]), 1)["zero_optimization"]["stage"] == 1
    assert deepspeed_dict(load_config(["--dist.zero_stage", "2"]), 1)["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("name, stage", [("ds_zero2.json", 2), ("ds_zero3.json", 3)])
def test_cluster_jsons(name, stage):
    from msf_scale.config import CONFIG_DIR
    path = CONFIG_DIR.parent / "cluster" / name
    cfg = load_config(["--dist.deepspeed_config", str(path), "--train.precision", "fp32"])
    ds = deepspeed_dict(cfg, 1)
    assert ds["zero_optimization"]["stage"] == stage and not ds["torch_autocast"]["enabled"]
    def values(d):
        for v in d.values():
            yield from values(v) if isinstance(v, dict) else [v]
    autos = [k for k, v in ds.items() if "auto" in list(values(v) if isinstance(v, dict) else [v])]
    assert autos == ["train_batch_size"]   # Accelerate fills it from the micro-batch x accumulation x ranks


def test_deepspeed_json_with_its_own_optimizer_is_refused(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="remove the 'optimizer' section"):
        deepspeed_dict(load_config(["--dist.deepspeed_config", str(p)]), 1)
    with pytest.raises(FileNotFoundError, match="cluster/ds_zero"):
        deepspeed_dict(load_config(["--dist.deepspeed_config", str(tmp_path / "nope.json")]), 1)


def test_global_batch_must_divide():
    assert resolve_grad_accum(load_config(["--train.batch_size", "8", "--train.global_batch", "64"]), 2) == 4
    with pytest.raises(ValueError, match="not a multiple"):
        resolve_grad_accum(load_config(["--train.batch_size", "8", "--train.global_batch", "60"]), 2)


def test_compiled_form_names_how_prepare_compiled_the_model():
    # what the run's start line and run_meta.json record; wrapping compiles nothing until a call (no compile here)
    from accelerate.utils import compile_regions, compile_regions_deepspeed

    from msf_scale.distributed import compiled_form
    from msf_scale.models import create_model

    def model():
        return create_model("videomamba", size="tiny", num_frames=2, img_size=32, num_classes=4, depth=3,
                            embed_dim=32)

    class Engine(torch.nn.Module):   # DeepSpeedEngine after engine.compile(): the flag is a property
        is_compiled = property(lambda self: True)

    assert compiled_form(model()) == "no"
    assert compiled_form(torch.compile(model())) == "whole"
    assert compiled_form(Engine()) == "whole"
    regional = compiled_form(compile_regions(model()))
    in_place = model()
    compile_regions_deepspeed(in_place)
    assert regional == compiled_form(in_place) == "regional (7 modules)"   # 3 blocks, the stem, norm, dropout, head
