"""One-process training runs through `main(argv)` (seconds each): run dir, export, resume, bad input, NaN."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import msf_scale.train as train_mod
import msf_scale.train_setup as setup_mod
from msf_scale.checkpoint import latest_checkpoint, list_checkpoints
from msf_scale.export import load_model
from msf_scale.config import read_config
from msf_scale.metrics import read_jsonl


def _losses(run_dir) -> dict[int, float]:
    """step -> logged loss; a step logged twice (a resume that did not truncate the log) is an error, not a
    row that a dict would silently overwrite."""
    rows = [(r["step"], r["loss"]) for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    steps = [s for s, _ in rows]
    assert len(steps) == len(set(steps)), f"steps logged more than once: {sorted(s for s in set(steps) if steps.count(s) > 1)}"
    return dict(rows)


@pytest.fixture
def captured(monkeypatch):
    """The model objects train.py builds (one process without DeepSpeed trains them in place)."""
    models = []
    real = setup_mod.build_model

    def create(*a, **kw):
        models.append(real(*a, **kw))
        return models[-1]
    monkeypatch.setattr(setup_mod, "build_model", create)
    return models


def test_run_dir_and_export_gives_training_logits(tiny_argv, tmp_path, captured):
    final = train_mod.main(tiny_argv("--epochs", "2", "--schedule.warmup_epochs", "1",
                                     "--train.ckpt_every", "3", "--train.keep_last", "2"))
    run = tmp_path / "run"
    for name in ("config.yaml", "run_meta.json", "metrics.jsonl", "eval.json", "final_metrics.json",
                 "model.safetensors", "model_config.json"):
        assert (run / name).is_file(), name
    assert final["step"] == 8 and final["epoch"] == 2 and final["clips_seen"] == 64
    assert json.loads((run / "final_metrics.json").read_text())["test_top1"] == final["test_top1"]
    assert final["test_samples"] == 16 and 0.0 <= final["test_top1"] <= final["test_top5"] <= 1.0
    meta = json.loads((run / "run_meta.json").read_text())
    assert (meta["engine"], meta["global_batch"], meta["world_size"]) == ("MSFMamba", 8, 1)
    assert read_config(run / "config.yaml").train.ckpt_every == 3
    # steps 3, 4 (epoch end), 6, 8 (epoch end + final) were saved; keep_last=2 leaves the newest two
    assert [p.name for p in list_checkpoints(run)] == ["step_0000006", "step_0000008"]
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    assert {"loss", "lr", "train_top1", "clips_per_s", "data_wait_share", "peak_mem_gb", "mfu"} <= set(rows[0])
    assert rows[0]["mfu"] is None  # no known peak on CPU

    trained = captured[0].eval()
    exported = load_model(run)
    x = torch.randn(3, 3, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(trained(x), exported(x))
    assert not exported.training and exported.cfg == trained.cfg


def test_resume_auto_continues_exactly_and_ignores_half_written(tiny_argv, tmp_path):
    args = ("--epochs", "3", "--schedule.warmup_epochs", "1", "--train.ckpt_every", "2")
    train_mod.main(tiny_argv(*args, run="full"))
    train_mod.main(tiny_argv(*args, "--max-steps", "6", run="part"))
    part = tmp_path / "part"
    assert latest_checkpoint(part).name == "step_0000006"
    # a crash mid-save leaves a .tmp directory or a directory without COMPLETE: --resume auto skips both
    shutil.copytree(part / "ckpt" / "step_0000006", part / "ckpt" / "step_0000010.tmp")
    (part / "ckpt" / "step_0000010.tmp" / "COMPLETE").unlink()
    shutil.copytree(part / "ckpt" / "step_0000006", part / "ckpt" / "step_0000011")
    (part / "ckpt" / "step_0000011" / "COMPLETE").unlink()
    assert latest_checkpoint(part).name == "step_0000006"
    final = train_mod.main(tiny_argv(*args, "--resume", "auto", run="part"))
    assert json.loads((part / "run_meta.json").read_text())["resumed_from"].endswith("step_0000006")
    full, resumed = _losses(tmp_path / "full"), _losses(part)
    assert sorted(resumed) == list(range(1, 13))   # rows logged after the checkpoint were truncated, then redone
    for step in range(7, 13):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step
    assert final["step"] == 12


def test_fresh_start_refuses_a_run_dir_with_checkpoints(tiny_argv):
    train_mod.main(tiny_argv("--epochs", "1", "--schedule.warmup_epochs", "0", "--max-steps", "1"))
    with pytest.raises(ValueError, match="--resume auto"):
        train_mod.main(tiny_argv("--epochs", "1", "--schedule.warmup_epochs", "0", "--max-steps", "2"))


def test_resume_with_other_class_count_is_refused(tiny_argv):
    train_mod.main(tiny_argv("--epochs", "1", "--schedule.warmup_epochs", "0", "--max-steps", "1"))
    with pytest.raises(ValueError, match=r"(?s)dataset.*num_classes: checkpoint 8 vs this run 4"):
        train_mod.main(tiny_argv("--epochs", "1", "--schedule.warmup_epochs", "0", "--resume", "auto",
                                 "--data.synth.num_classes", "4"))


def test_missing_data_dir(tiny_argv, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train_mod.main(tiny_argv("--data", str(tmp_path / "nowhere")))


def _nan_on_calls(monkeypatch, calls: set[int]):
    """Make the training forward return NaN logits on the given (1-based) training forward calls."""
    real, n = setup_mod.build_model, [0]

    def hook(module, inputs, out):
        if not module.training:
            return out
        n[0] += 1
        return out * float("nan") if n[0] in calls else out

    def create(*a, **kw):
        model = real(*a, **kw)
        model.register_forward_hook(hook)
        return model
    monkeypatch.setattr(setup_mod, "build_model", create)


def test_nan_loss_skips_the_update(tiny_argv, tmp_path, monkeypatch):
    _nan_on_calls(monkeypatch, {2, 3})
    final = train_mod.main(tiny_argv("--epochs", "1", "--schedule.warmup_epochs", "0", "--train.max_bad_steps", "3"))
    assert final["bad_steps"] == 2
    assert final["step"] == 2           # 4 batches in the epoch, two of them skipped
    weights = load_model(tmp_path / "run").state_dict()
    assert all(torch.isfinite(w).all() for w in weights.values())  # a NaN update would have poisoned them


def test_nan_loss_in_a_row_aborts(tiny_argv, monkeypatch):
    _nan_on_calls(monkeypatch, set(range(1, 100)))
    with pytest.raises(FloatingPointError, match=r"2 non-finite losses in a row.*max_bad_steps=2"):
        train_mod.main(tiny_argv("--epochs", "1", "--schedule.warmup_epochs", "0", "--train.max_bad_steps", "2"))


def test_ema_is_trained_evaluated_and_exported(tiny_argv, tmp_path):
    final = train_mod.main(tiny_argv("--epochs", "1", "--schedule.warmup_epochs", "0", "--train.ema", "true",
                                     "--train.ema_decay", "0.5"))
    assert "ema_test_top1" in final
    ema, model = load_model(tmp_path / "run", ema=True), load_model(tmp_path / "run")
    diff = [not torch.equal(a, b) for a, b in zip(ema.state_dict().values(), model.state_dict().values())]
    assert any(diff)  # an average of the iterates, not a copy of the last one


def test_eval_cli_matches_training_eval_and_does_multiview(tiny_argv, tmp_path, capsys):
    from msf_scale import evaluate
    final = train_mod.main(tiny_argv("--epochs", "1", "--schedule.warmup_epochs", "0"))
    run = tmp_path / "run"
    assert evaluate.main(["--ckpt", str(run), "--num-workers", "0"]) == 0
    res = json.loads((run / "eval_test.json").read_text())
    assert (res["top1"], res["top5"], res["num_samples"], res["views"]) == (
        final["test_top1"], final["test_top5"], 16, 1)
    assert "top-1" in capsys.readouterr().out
    out = tmp_path / "mv.json"
    assert evaluate.main(["--ckpt", str(run / "model.safetensors"), "--num-clips", "2", "--num-crops", "2",
                          "--num-workers", "0", "--out", str(out)]) == 0
    mv = json.loads(out.read_text())
    assert (mv["views"], mv["num_samples"]) == (4, 16)


def _evals(run) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if "test_top1" in r]


def _check_best(run, evals: list[dict]) -> None:
    best = max(evals, key=lambda r: r["test_top1"])                            # the first of equals, like the loop
    conf = json.loads((run / "best" / "model_config.json").read_text())
    assert (conf["step"], conf["test_top1"]) == (best["step"], best["test_top1"])
    assert not (run / "best.tmp").exists() and not (run / "best.old").exists()


def test_best_export_is_the_best_evaluation(tiny_argv, tmp_path):
    train_mod.main(tiny_argv("--epochs", "3", "--schedule.warmup_epochs", "1", "--train.eval_every", "1",
                             "--optim.lr", "0.05"))
    run = tmp_path / "run"
    evals = _evals(run)
    assert [r["step"] for r in evals] == [4, 8, 12]                            # epochs 1 and 2, then the end
    _check_best(run, evals)
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        same = torch.equal(load_model(run / "best")(x), load_model(run)(x))
    assert same == (max(evals, key=lambda r: r["test_top1"])["step"] == 12)    # the final export iff best at the end


def test_best_survives_resume_and_a_crash_between_renames(tiny_argv, tmp_path):
    """A resumed run must beat what best/ holds, not forget it (the last checkpoint can predate the evaluation
    that made it); a crash that left only best.old/ must not lose the best either."""
    argv = ("--epochs", "4", "--schedule.warmup_epochs", "1", "--train.eval_every", "1", "--optim.lr", "0.05")
    train_mod.main(tiny_argv(*argv, "--max-steps", "8"))
    run = tmp_path / "run"
    first = _evals(run)
    assert [r["step"] for r in first] == [4, 8]
    shutil.move(run / "best", run / "best.old")                                # as if killed between the renames
    train_mod.main(tiny_argv(*argv, "--resume", "auto"))
    evals = _evals(run)
    assert [r["step"] for r in evals] == [4, 8, 12, 16]
    _check_best(run, evals)


def test_accumulation_checkpointing_layer_decay_bf16(tiny_argv, tmp_path):
    final = train_mod.main(tiny_argv("--epochs", "1", "--schedule.warmup_epochs", "0", "--train.grad_accum", "2",
                                     "--model.grad_checkpointing", "true", "--optim.layer_decay", "0.8",
                                     "--train.precision", "bf16"))
    meta = json.loads((tmp_path / "run" / "run_meta.json").read_text())
    assert (meta["grad_accum"], meta["global_batch"], meta["steps_per_epoch"]) == (2, 16, 2)
    assert final["step"] == 2 and final["clips_seen"] == 32
    assert all(r["loss"] == r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r)


def test_global_batch_sets_accumulation(tiny_argv, tmp_path):
    train_mod.main(tiny_argv("--epochs", "1", "--schedule.warmup_epochs", "0", "--train.global_batch", "32"))
    assert json.loads((tmp_path / "run" / "run_meta.json").read_text())["grad_accum"] == 4
    with pytest.raises(ValueError, match="train.global_batch=20 is not a multiple"):
        train_mod.main(tiny_argv("--train.global_batch", "20", run="other"))
