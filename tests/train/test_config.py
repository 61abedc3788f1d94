"""Config presets, precedence, coercion and validation (fast, no training)."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from msf_scale.config import (CONFIG_DIR, SIZES, RunConfig, build, load_config, read_config, save_config,
                              valid_keys)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_preset_loads(path):
    cfg = load_config(["--size", path.parent.name, "--config", path.stem])
    assert cfg.model.size == path.parent.name
    doc = yaml.safe_load(path.read_text())
    for section, fields in doc.items():   # the file's values win over the dataclass defaults
        for name, value in fields.items():
            got = getattr(getattr(cfg, section), name)
            assert (list(got) if isinstance(got, tuple) else got) == value or (
                isinstance(value, dict) and got == {**value}), f"{section}.{name}"


@pytest.mark.parametrize("size", SIZES)
def test_default_presets_follow_spec_recipe(size):
    cfg = load_config(["--size", size])
    assert (cfg.model.num_frames, cfg.model.img_size, cfg.train.precision) == (8, 224, "bf16")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas) == (4e-4, 0.05, (0.9, 0.999))
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs, cfg.optim.label_smoothing) == (50, 5, 0.1)
    assert cfg.optim.layer_decay == 1.0


def test_cpu_demo_is_small_and_cpu_friendly():
    cfg = load_config(["--config", "cpu_demo"])
    assert (cfg.model.size, cfg.model.variant, cfg.model.img_size) == ("tiny", "msf_mamba", 32)
    assert cfg.model.arch["patch_size"] == 16 and cfg.train.precision == "fp32"   # 32 tokens per clip


def test_precedence_cli_over_config_over_default(tmp_path):
    extra = tmp_path / "x.yaml"
    extra.write_text("optim: {lr: 1.0e-3, weight_decay: 0.1}\nmodel: {size: small, arch: {patch_size: 8}}\n")
    cfg = load_config(["--config", str(extra), "--optim.lr", "2e-3", "--model.arch.theta_dummy=1"])
    assert cfg.model.size == "small"               # the path config names its size
    assert cfg.optim.lr == 2e-3                      # CLI beats the file
    assert cfg.optim.weight_decay == 0.1             # the file beats the preset
    assert cfg.train.batch_size == load_config(["--size", "small"]).train.batch_size  # preset of that size
    assert cfg.model.arch == {"patch_size": 8, "theta_dummy": 1}  # dict keys merge


def test_short_flags_map_to_fields():
    cfg = load_config(["--size", "base", "--variant", "msf_mamba_plus", "--data", "/d", "--output-dir", "/o",
                       "--max-steps", "7", "--epochs", "3", "--schedule.warmup_epochs", "1", "--resume", "auto"])
    assert (cfg.model.size, cfg.model.variant, cfg.data.root) == ("base", "msf_mamba_plus", "/d")
    assert (str(cfg.run_dir()), cfg.train.max_steps, cfg.schedule.epochs, cfg.train.resume) == ("/o", 7, 3, "auto")


@pytest.mark.parametrize("argv, typed", [
    (["--train.batch_size", "16"], ("train", "batch_size", 16)),
    (["--train.max_steps", "1e3"], ("train", "max_steps", 1000)),
    (["--optim.lr", "3e-4"], ("optim", "lr", 3e-4)),
    (["--train.ema", "yes"], ("train", "ema", True)),
    (["--model.drop_path_rate", "none"], ("model", "drop_path_rate", None)),
    (["--optim.betas", "0.9,0.95"], ("optim", "betas", (0.9, 0.95))),
    (["--log.peak_tflops=989"], ("log", "peak_tflops", 989.0)),
])
def test_types_come_from_annotations(argv, typed):
    section, name, value = typed
    got = getattr(getattr(load_config(argv), section), name)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("argv, match", [
    (["--optim.lrr", "1"], r"did you mean 'optim.lr'"),
    (["--trian.batch_size", "1"], r"did you mean 'train.batch_size'"),
    (["--size", "huge"], r"unknown size 'huge'"),
    (["--variant", "mamba"], r"model.variant"),
    (["--train.batch_size", "1.5"], r"train.batch_size: expected an integer"),
    (["--train.batch_size", "0"], r"train.batch_size: must be >= 1"),
    (["--train.precision", "fp16"], r"train.precision"),
    (["--optim.betas", "0.9"], r"optim.betas"),
    (["--train.ema", "maybe"], r"train.ema: expected true/false"),
    (["--schedule.warmup_epochs", "80"], r"schedule.warmup_epochs"),
    (["--dist.zero_stage", "4"], r"dist.zero_stage"),
    (["--train.compile", "yes"], r"train.compile: 'yes' is not one of none"),
    (["--model.arch.num_classes", "3"], r"model.arch"),
    (["--config", "nope"], r"unknown config 'nope'.*default"),
    (["--optim.lr"], r"needs a value"),
    (["stray"], r"unexpected argument"),
])
def test_bad_values_name_the_field(argv, match):
    with pytest.raises(ValueError, match=match):
        load_config(argv)


def test_unknown_key_in_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {weight_decy: 0.1}\n")
    with pytest.raises(ValueError, match="optim.weight_decay"):
        load_config(["--config", str(bad)])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(["--size", "small", "--optim.betas", "0.8,0.9", "--model.arch.patch_size", "8"])
    save_config(cfg, tmp_path / "config.yaml")
    again = read_config(tmp_path / "config.yaml")
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_every_field_is_overridable():
    """Each section.field path is accepted on the command line with its own current value."""
    base = RunConfig()
    for key in valid_keys():
        section, name = key.split(".")
        value = getattr(getattr(base, section), name)
        if isinstance(value, dict) or value is None:
            continue
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        cfg = build({section: {name: text}})
        assert getattr(getattr(cfg, section), name) == value, key


def test_compile_settings_become_accelerates_plugin(monkeypatch, tmp_path):
    from msf_scale.distributed import check_compile_with_zero, dynamo_plugin

    # the launcher's settings, which train.compile overrides
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "AOT_EAGER")
    monkeypatch.setenv("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "true")
    assert dynamo_plugin(load_config([])) is None                    # none: Accelerate reads the launcher's
    plugin = dynamo_plugin(load_config(["--train.compile", "whole"]))
    assert (plugin.backend.value, plugin.use_regional_compilation) == ("INDUCTOR", False)
    plugin = dynamo_plugin(load_config(["--train.compile", "regional", "--train.compile_backend", "aot_eager"]))
    assert (plugin.backend.value, plugin.use_regional_compilation) == ("AOT_EAGER", True)
    plugin = dynamo_plugin(load_config(["--train.compile", "no"]))
    assert (plugin.backend.value, plugin.use_regional_compilation) == ("NO", False)
    for backend in ("inductr", "no"):   # a typo, or a compile that would compile nothing
        with pytest.raises(ValueError, match=r"train.compile_backend: '.*' is not one of eager, aot_eager"):
            dynamo_plugin(load_config(["--train.compile", "whole", "--train.compile_backend", backend]))
    yaml = tmp_path / "c.yaml"
    for text, want in (("no", "no"), ("off", "no"), ("yes", "whole"), ("regional", "regional")):
        yaml.write_text(f"train: {{compile: {text}}}\n")   # YAML reads an unquoted no / off / yes as a bool
        assert load_config(["--config", str(yaml)]).train.compile == want

    # ZeRO-3: compile refused, whether train.compile or the launcher asks for it
    zero3, zero2 = {"zero_optimization": {"stage": 3}}, {"zero_optimization": {"stage": 2}}
    with pytest.raises(ValueError, match=r"ZeRO-3"):
        check_compile_with_zero(dynamo_plugin(load_config(["--train.compile", "regional"])), zero3)
    with pytest.raises(ValueError, match=r"ZeRO-3"):
        check_compile_with_zero(None, zero3)                          # the launcher's AOT_EAGER
    check_compile_with_zero(dynamo_plugin(load_config(["--train.compile", "no"])), zero3)
    check_compile_with_zero(dynamo_plugin(load_config(["--train.compile", "regional"])), zero2)
    check_compile_with_zero(dynamo_plugin(load_config(["--train.compile", "whole"])), None)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    check_compile_with_zero(None, zero3)
