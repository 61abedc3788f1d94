"""The defects a new user hit (issue 16), each with the test that failed before its fix: the export's data
record and `eval --ckpt RUN/best`, the launcher's mixed precision, corrupt-sample reporting, one-line user errors,
the CPU memory pre-flight, `--help` with the preset's values, trackers through Accelerate."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import msf_scale.train as train_mod
import msf_scale.train_setup as setup_mod
from msf_scale import evaluate
from msf_scale.config import ConfigError, load_config
from msf_scale.data.schema import DatasetInfo, ShardSink, make_sample, npy_bytes, write_dataset_info
from msf_scale.metrics import read_jsonl


# ------------------------------------------------------------------ 2. the export records its data; eval uses it
def test_export_records_data_and_eval_of_best_uses_it(tiny_argv, tmp_path, capsys):
    final = train_mod.main(tiny_argv("--epochs", "1", "--schedule.warmup_epochs", "0"))
    run = tmp_path / "run"
    for conf in (run / "model_config.json", run / "best" / "model_config.json"):
        meta = json.loads(conf.read_text())
        assert meta["num_classes"] == 8 and len(meta["class_names"]) == 8 and meta["dataset"].startswith("synthetic")
        pre = meta["preprocessing"]
        assert (pre["num_frames"], pre["img_size"], pre["num_clips"], pre["num_crops"]) == (4, 32, 1, 1)
        assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225]
        assert meta["data"]["synthetic"] and meta["data"]["synth"]["train_per_class"] == 4
    trained_on = json.loads((run / "run_meta.json").read_text())["data"]
    assert evaluate.main(["--ckpt", str(run / "best"), "--num-workers", "0"]) == 0   # best/ has no config.yaml
    res = json.loads((run / "best" / "eval_test.json").read_text())
    assert res["data"] == trained_on and res["num_samples"] == final["test_samples"] == 16


def _synth_dataset(root, num_classes: int, n: dict[str, int], corrupt: dict[str, int] | None = None,
                   frames: int = 4, size: int = 32) -> None:
    """Random clips; `corrupt[split]` of them with undecodable bytes."""
    rng, corrupt = np.random.default_rng(0), corrupt or {}
    root.mkdir(parents=True, exist_ok=True)
    infos = {}
    for split, count in n.items():
        sink = ShardSink(root, split, 64)
        for i in range(count):
            label = i % num_classes
            data = b"not an npy array" if i < corrupt.get(split, 0) else npy_bytes(
                rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8))
            sink.write(make_sample(f"{split}_{i:04d}", label, data, "npy", {"label": label, "subject": f"s{i % 2}"}))
        infos[split] = sink.close()
    write_dataset_info(root, DatasetInfo(name="toy", num_classes=num_classes,
                                         class_names=[f"c{i}" for i in range(num_classes)], splits=infos,
                                         num_frames=frames, height=size, width=size, flip_ok=True))


def test_eval_refuses_a_dataset_with_other_classes(tiny_argv, tmp_path, capsys):
    train_mod.main(tiny_argv("--max-steps", "1"))
    other = tmp_path / "other"
    _synth_dataset(other, num_classes=4, n={"test": 8})
    capsys.readouterr()
    assert evaluate.main(["--ckpt", str(tmp_path / "run" / "best"), "--data", str(other), "--num-workers", "0"]) == 2
    out = capsys.readouterr().out
    assert "the model has 8 classes but" in out and "has 4" in out and "Traceback" not in out


def test_eval_of_an_export_without_record_asks_for_data(tiny_argv, tmp_path, capsys):
    train_mod.main(tiny_argv("--max-steps", "1"))
    best = tmp_path / "run" / "best" / "model_config.json"
    meta = json.loads(best.read_text())
    del meta["data"]
    best.write_text(json.dumps(meta))
    assert evaluate.main(["--ckpt", str(best.parent), "--num-workers", "0"]) == 2
    assert "pass --data" in capsys.readouterr().out


def test_eval_refuses_synthetic_data_that_the_generator_no_longer_makes(tiny_argv, tmp_path, capsys):
    """The export records synthetic data by its generator parameters; once those make other clips (a preset or the
    generator changed: here, the recorded parameters edited), eval must not silently evaluate on the new clips."""
    train_mod.main(tiny_argv("--max-steps", "1"))
    best = tmp_path / "run" / "best" / "model_config.json"
    assert evaluate.main(["--ckpt", str(best.parent), "--num-workers", "0"]) == 0   # unchanged: evaluates
    meta = json.loads(best.read_text())
    meta["data"]["synth"]["noise_std"] = 7.0   # the same parameters would now generate another dataset
    best.write_text(json.dumps(meta))
    capsys.readouterr()
    assert evaluate.main(["--ckpt", str(best.parent), "--num-workers", "0"]) == 2
    out = capsys.readouterr().out
    assert "generate synthetic-" in out and meta["dataset"] in out and "--data" in out and "Traceback" not in out


# ------------------------------------------------------------------ 3. the launcher's mixed precision
@pytest.fixture
def accel_reset():
    from msf_scale import distributed as dist
    dist.reset_state()
    yield
    dist.reset_state()


@pytest.mark.parametrize("asked,precision,ok", [("bf16", "bf16", True), ("no", "fp32", True), ("no", "bf16", True),
                                                ("bf16", "fp32", False), ("fp16", "fp32", False),
                                                ("fp16", "bf16", False)])
def test_launcher_mixed_precision_is_honoured_or_refused(monkeypatch, tmp_path, accel_reset, asked, precision, ok):
    from msf_scale.distributed import build_accelerator

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", asked)   # what `accelerate launch --mixed_precision` sets
    cfg = load_config(["--train.precision", precision, "--log.tensorboard", "false",
                       "--output-dir", str(tmp_path / "r")])
    if ok:
        assert build_accelerator(cfg).mixed_precision == ("bf16" if precision == "bf16" else "no")
    else:
        with pytest.raises(ConfigError, match=r"mixed_precision is (bf16|fp16).*--train.precision|mixed_precision"):
            build_accelerator(cfg)


@pytest.mark.parametrize("section,precision,match", [({"bf16": {"enabled": True}}, "fp32", "enables bf16"),
                                                     ({"fp16": {"enabled": True}}, "bf16", "enables fp16"),
                                                     ({"bf16": {"enabled": "auto"}}, "fp32", None),
                                                     ({"bf16": {"enabled": True}}, "bf16", None)])
def test_deepspeed_json_precision_agrees_or_is_refused(tmp_path, section, precision, match):
    from msf_scale.distributed import deepspeed_dict

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **section}))
    cfg = load_config(["--dist.deepspeed_config", str(path), "--train.precision", precision])
    if match is None:
        ds = deepspeed_dict(cfg, 1)
        assert ds["torch_autocast"]["enabled"] == (precision == "bf16")
    else:
        with pytest.raises(ConfigError, match=match):
            deepspeed_dict(cfg, 1)


# ------------------------------------------------------------------ 4. corrupt samples are reported
def test_corrupt_counts_reach_metrics_progress_and_summary(tiny_argv, tmp_path, capsys):
    data = tmp_path / "data"
    _synth_dataset(data, num_classes=4, n={"train": 16, "test": 8}, corrupt={"train": 1, "test": 1})
    final = train_mod.main(tiny_argv("--data", str(data), "--epochs", "2", "--schedule.warmup_epochs", "0",
                                     "--train.eval_every", "1"))
    run = tmp_path / "run"
    rows = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert rows[-1]["corrupt_samples"] == 2 and rows[0]["corrupt_samples"] <= 1   # met once an epoch
    summary = json.loads((run / "final_metrics.json").read_text())
    assert (summary["corrupt_samples"], summary["test_corrupt_samples"]) == (2, 1) == (
        final["corrupt_samples"], final["test_corrupt_samples"])
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "test_top1" in r]
    assert [r["test_corrupt_samples"] for r in evals] == [1, 1]   # per evaluation (after epoch 1, at the end)
    out = capsys.readouterr().out
    assert "corrupt training samples skipped so far" in out and "skipped 2 corrupt training samples" in out


# ------------------------------------------------------------------ 5. user errors: one line, exit 2
@pytest.mark.parametrize("argv,needle", [(["--schedule.warmup_epochs", "70"], "schedule.warmup_epochs"),
                                         (["--optim.lrr", "1"], "did you mean 'optim.lr'"),
                                         (["--train.batch_size", "many"], "expected an integer"),
                                         (["--config", "nope"], "unknown config 'nope'"),
                                         (["--data", "/nowhere/data"], "/nowhere/data"),
                                         (["--model.arch.pool", "median"], "pool must be"),
                                         (["--model.arch.pach_size", "8"], "did you mean patch_size"),
                                         (["--model.arch.stem", "conv", "--model.arch.stem_temporal_kernel", "5"],
                                          "must be 1 or 3"),
                                         (["--variant", "cnn3d"], "unknown cnn3d option(s): depth")])
def test_user_errors_print_one_line_and_exit_2(tiny_argv, capsys, argv, needle):
    assert train_mod.cli(tiny_argv(*argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msf-scale train: error: ") and needle in err[0], err


def test_a_bug_keeps_its_traceback(tiny_argv, monkeypatch):
    def broken(*a, **kw):
        raise ValueError("an internal bug")
    monkeypatch.setattr(setup_mod, "build_model", broken)
    with pytest.raises(ValueError, match="internal bug"):
        train_mod.cli(tiny_argv())


# ------------------------------------------------------------------ 6. CPU memory pre-flight
def test_gpu_recipe_on_a_24gb_cpu_machine_is_refused_with_the_flag(tiny_common, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(setup_mod, "available_memory_gb", lambda: 24.0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")   # as under accelerate launch --num_processes 2
    argv = ["--size", "tiny", *tiny_common[tiny_common.index("--data.synth.train_per_class"):],
            "--output-dir", str(tmp_path / "r"), "--data.num_workers", "0"]
    assert train_mod.cli(argv) == 2
    err = capsys.readouterr().err
    assert "exceeds the 24.0 GB free" in err and "--train.batch_size" in err and "2 process(es) x batch 32" in err


def test_memory_estimate_passes_the_main_job_and_warns_when_close(monkeypatch, capsys):
    from msf_scale.models.msf_mamba import build_config

    demo = load_config(["--config", "cpu_demo"])
    demo_model = build_config("msf_mamba", "tiny", num_classes=8, num_frames=8, img_size=32, patch_size=16)
    monkeypatch.setattr(setup_mod, "available_memory_gb", lambda: 24.0)
    setup_mod.preflight_memory(demo, demo_model, torch.device("cpu"), 1)          # ~1.6 GB: silent
    assert capsys.readouterr().out == ""
    gpu = load_config(["--size", "tiny", "--train.batch_size", "16"])
    model = build_config("msf_mamba", "tiny", num_classes=8)
    setup_mod.preflight_memory(gpu, model, torch.device("cuda"), 2)               # GPUs: not this check
    monkeypatch.setattr(setup_mod, "available_memory_gb", lambda: 11.0)
    setup_mod.preflight_memory(gpu, model, torch.device("cpu"), 1)                # ~8.6 GB of 11: a warning
    assert "warning: estimated training memory" in capsys.readouterr().out
    off = load_config(["--size", "tiny", "--train.mem_check", "false"])
    setup_mod.preflight_memory(off, model, torch.device("cpu"), 2)                # refused unless asked
    assert "exceeds" in capsys.readouterr().out


# ------------------------------------------------------------------ 7. --help shows the preset in use
def test_help_shows_the_values_of_the_preset_in_use(capsys):
    with pytest.raises(SystemExit) as stop:
        train_mod.main(["--size", "base", "--help"])
    assert stop.value.code == 0
    base = capsys.readouterr().out
    line = lambda text, key: next(l for l in text.splitlines() if l.strip().startswith(key + " "))  # noqa: E731
    assert line(base, "--dist.zero_stage").split()[1] == "2" and line(base, "--train.batch_size").split()[1] == "16"
    assert "collective timeout" in line(base, "--dist.timeout_min")
    with pytest.raises(SystemExit):
        train_mod.main(["--config", "cpu_demo", "--optim.lr", "3e-3", "-h"])
    demo = capsys.readouterr().out
    assert line(demo, "--model.img_size").split()[1] == "32" and line(demo, "--optim.lr").split()[1] == "0.003"
    assert "cpu_demo.yaml" in demo


# ------------------------------------------------------------------ trackers through Accelerate
def test_tensorboard_through_accelerate_and_missing_trackers_refused(tiny_argv, tmp_path):
    import importlib.util

    train_mod.main(tiny_argv("--max-steps", "2", "--log.tensorboard", "true"))
    assert list((tmp_path / "run" / "tb").rglob("events.out.tfevents.*"))
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbored'"):
        train_mod.main(tiny_argv("--log.log_with", "tensorbored", run="r2"))
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="pip install wandb"):
            train_mod.main(tiny_argv("--log.log_with", "tensorboard,wandb", run="r3"))
