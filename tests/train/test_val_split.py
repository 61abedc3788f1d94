"""The val split inside train.py runs (issue 18): `--data.val_fraction F` carves whole training subjects out of the
training stream (never a test subject), a dataset's own val split is used as it is, every evaluation is on val and
best/ is chosen on val top-1, the test split is evaluated once at the end; a run without a val split keeps
evaluating and selecting on test, and says so. The runs are the tiny stand-in of the other training tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import msf_scale.train_steps as steps_mod
from msf_scale.config import ConfigError, load_config
from msf_scale.data import synthesize
from msf_scale.data.builders import train_loader, val_loader, val_split
from msf_scale.data.schema import DatasetInfo, ShardSink, make_sample, npy_bytes, write_dataset_info
from msf_scale.data.splits import plan_carve, read_subjects
from msf_scale.data.streams import ErrorLog
from msf_scale.export import best_top1, load_model
from msf_scale.metrics import read_jsonl
from msf_scale.train import Callback, cli, main, train

CLIP = dict(num_frames=4, img_size=16, batch_size=4, rank=0, world_size=1)


def _dataset(root, subjects: dict[str, list[str]], per_subject: int = 3, shard_size: int = 5):
    """A small npy dataset whose splits hold the given subjects (train and test may share some)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    infos = {}
    for split, names in subjects.items():
        sink = ShardSink(root, split, shard_size)
        for j, subject in enumerate(s for s in names for _ in range(per_subject)):
            label = j % 4
            meta = {"label": label, "label_name": f"c{label}", "subject": subject, "num_frames": 4, "fps": 10,
                    "height": 16, "width": 16, "source": "test"}
            video = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
            sink.write(make_sample(f"{split}_{subject}_{j:04d}", label, npy_bytes(video), "npy", meta))
        infos[split] = sink.close()
    write_dataset_info(root, DatasetInfo(name="toy", num_classes=4, class_names=[f"c{i}" for i in range(4)],
                                         splits=infos, num_frames=4, height=16, width=16, flip_ok=True, format="npy"))
    return str(root)


def _train_keys(loader, n: int) -> set[str]:
    """The keys of the first n raw samples the training stream hands to decoding (one stream: no workers)."""
    raw = loader.stream._raw(0, 1, ErrorLog())
    return {next(raw)["__key__"] for _ in range(n)}


def test_carve_shares_no_subject_with_train_or_test_and_the_loaders_keep_to_it(tmp_path):
    # s4 and s5 are in train and in test: a carve-out must never move them to val (val would then share test's)
    root = _dataset(tmp_path / "ds", {"train": [f"s{i}" for i in range(6)], "test": ["s4", "s5", "s6"]})
    train_subj, test_subj = read_subjects(root, "train"), set(read_subjects(root, "test").values())
    seen = set()
    for seed in range(6):
        cfg = load_config(["--data.val_fraction", "0.4", "--data.num_workers", "0", "--data.val_seed", str(seed)])
        val = val_split(cfg.data, root)
        c = val.carve
        assert val.source == "carved" and set(c.val_subjects) == {train_subj[k] for k in c.val_keys}
        assert not set(c.val_subjects) & set(c.train_subjects) and not set(c.val_subjects) & test_subj
        assert c.val_keys | c.train_keys == set(train_subj) and not c.val_keys & c.train_keys
        # the fraction is of the 4 candidates (s4, s5 are test's too): round(0.4 x 4) = 2, and the run says so
        assert len(c.val_subjects) == 2 and c.shared_with_test == ("s4", "s5")
        assert "carved from train: 2 of the 4 training subjects not also in test" in val.describe()
        assert "2 more training subjects are also in test" in val.describe()
        seen |= set(c.val_subjects)
        # what the loaders read: the training stream never hands a val clip on, the val loader reads exactly them
        loader = train_loader(cfg.data, root, seed=seed, val=val, **CLIP)
        assert len(loader) == -(-len(c.train_keys) // 4)                       # an epoch of the kept clips
        assert _train_keys(loader, 4 * len(train_subj)) == set(c.train_keys)
        vl = val_loader(cfg.data, root, val, **CLIP)
        keys = [k for _, _, ks in vl for k in ks]
        assert sorted(keys) == sorted(c.val_keys) and vl.num_samples == len(c.val_keys)
    assert seen == {"s0", "s1", "s2", "s3"}                                   # seeded: the choice varies


@pytest.mark.parametrize("shard_size", [3, 40])   # more shards than the 4 streams, and one shard they share
def test_carved_val_is_read_once_across_ranks_and_workers(tmp_path, shard_size):
    root = _dataset(tmp_path / "ds", {"train": [f"s{i}" for i in range(5)], "test": ["s9"]}, per_subject=3,
                    shard_size=shard_size)
    cfg = load_config(["--data.val_fraction", "0.4", "--data.num_workers", "2"])
    val = val_split(cfg.data, root)
    keys = []
    for rank in (0, 1):
        vl = val_loader(cfg.data, root, val, **{**CLIP, "rank": rank, "world_size": 2})
        got = [k for _, _, ks in vl for k in ks]
        assert len(got) == vl.num_samples
        keys += got
    assert sorted(keys) == sorted(val.carve.val_keys)                         # every val clip once, over 2 x 2 streams


def test_a_datasets_own_val_split_is_used_and_a_second_carve_refused(tmp_path):
    root = synthesize(tmp_path / "v", workers=1, val_subjects=2, train_per_class=3, test_per_class=2, num_frames=4,
                      size=16, shard_size=8)
    cfg = load_config(["--data.num_workers", "0"])
    val = val_split(cfg.data, str(root))
    assert val.source == "dataset" and val.carve is None and not val.shared
    assert set(val.subjects) == set(read_subjects(root, "val").values())
    assert sorted(k for _, _, ks in val_loader(cfg.data, str(root), val, **CLIP) for k in ks) == sorted(
        read_subjects(root, "val"))
    with pytest.raises(ConfigError, match="has its own val split"):
        val_split(load_config(["--data.val_fraction", "0.2"]).data, str(root))


class Seen(Callback):
    def __init__(self):
        self.evals = []

    def on_evaluate(self, metrics):
        self.evals.append(metrics)


def test_a_run_with_val_fraction_reports_val_top1_and_tests_once(tiny_argv, tmp_path, capsys):
    seen = Seen()
    result = train(load_config(tiny_argv("--epochs", "2", "--schedule.warmup_epochs", "1", "--train.eval_every", "1",
                                         "--data.val_fraction", "0.25", "--train.seed", "3")), callbacks=[seen])
    run, final = result.run_dir, result.metrics
    meta = json.loads((run / "run_meta.json").read_text())
    n_val = meta["val"]["num_samples"]
    assert meta["val"]["source"] == "carved" and meta["best_selected_on"] == "val_top1" and n_val > 0
    # the carve is seeded by data.val_seed (default 0), not train.seed: another training seed, the same val subjects
    by_seed = {s: plan_carve(meta["data"], 0.25, s)[0].val_subjects for s in (0, 3)}
    assert by_seed[0] != by_seed[3] and meta["val"]["seed"] == 0 and tuple(meta["val"]["subjects"]) == by_seed[0]
    assert meta["steps_per_epoch"] == meta["val"]["train_samples"] // 8           # the carved clips left training
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "val_top1" in r or "test_top1" in r]
    assert [("val_top1" in r, "test_top1" in r) for r in evals] == [(True, False), (True, True)]  # test: end only
    assert all(r["val_samples"] == n_val for r in evals) and evals[-1]["test_samples"] == 16
    assert final["val_top1"] == evals[-1]["val_top1"] and final["test_top1"] == evals[-1]["test_top1"]
    assert final["best_selected_on"] == "val_top1" and result.selected_on == "val_top1"
    assert result.best_top1 == final["best_val_top1"] == max(r["val_top1"] for r in evals)
    assert "best_test_top1" in final                                              # best/'s own test figure
    assert [set(m) & {"val_top1", "test_top1", "best_val_top1", "best_test_top1"} for m in seen.evals] == [
        {"val_top1", "best_val_top1"}, {"val_top1", "test_top1", "best_val_top1"}]
    out = capsys.readouterr().out
    assert "val split: carved from train" in out and "val_top1" in out.split("val split:")[1]


def _scripted(monkeypatch, val_scores, test_scores):
    """evaluate_model returning the given top-1 in turn for the val and the test loader: val and test disagree on
    which evaluation is best, so what best/ holds shows what it was chosen on. `weights` keeps the weights each test
    evaluation was given, so that a test can check which model it measured."""
    calls = {"val": list(val_scores), "test": list(test_scores)}

    def fake(model, loader, acc, views, autocast_bf16=False):
        split = "test" if any("/test-" in u for u in loader.stream.urls) else "val"
        top1 = calls[split].pop(0)
        if split == "test":
            weights.append({k: v.detach().clone() for k, v in getattr(model, "module", model).state_dict().items()})
        return {"top1": top1, "top5": 1.0, "num_samples": 8, "views": 1}
    weights: list[dict[str, torch.Tensor]] = []
    monkeypatch.setattr(steps_mod, "evaluate_model", fake)
    return calls, weights


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_best_is_chosen_on_val_and_its_test_measured_once(tiny_argv, monkeypatch):
    # val best at epoch 2 of 3; test (final weights, then best/'s weights) is only read at the end
    calls, weights = _scripted(monkeypatch, [0.25, 0.75, 0.5], [0.125, 0.625])
    final = main(tiny_argv("--epochs", "3", "--schedule.warmup_epochs", "1", "--train.eval_every", "1",
                           "--data.val_fraction", "0.25"))
    assert calls == {"val": [], "test": []}
    run = Path(final["run_dir"])
    # which model each test evaluation measured: the final weights, then best/'s (epoch 2), not the final ones again
    best_w, final_w = load_model(run / "best").state_dict(), load_model(run).state_dict()
    assert not _same(best_w, final_w)                                   # training moved on after best/
    assert len(weights) == 2 and _same(weights[0], final_w) and _same(weights[1], best_w)
    best = json.loads((run / "best" / "model_config.json").read_text())
    steps = json.loads((run / "run_meta.json").read_text())["steps_per_epoch"]
    assert best["selected_on"] == "val_top1" and best["val_top1"] == 0.75 and best["step"] == 2 * steps
    assert best["test_top1"] == 0.625                                   # measured on best/'s weights, recorded
    assert (final["best_val_top1"], final["best_step"], final["best_test_top1"]) == (0.75, 2 * steps, 0.625)
    assert (final["val_top1"], final["test_top1"]) == (0.5, 0.125)       # the final weights
    assert best_top1(run, "val_top1") == 0.75 and best_top1(run, "test_top1") == -1.0   # what a resume must beat


def test_final_test_false_never_reads_test(tiny_argv, monkeypatch):
    calls, _ = _scripted(monkeypatch, [0.5, 0.25], [])
    final = main(tiny_argv("--epochs", "2", "--schedule.warmup_epochs", "1", "--train.eval_every", "1",
                           "--data.val_fraction", "0.25", "--train.final_test", "false"))
    assert calls["val"] == [] and not {k for k in final if "test" in k}
    assert final["best_val_top1"] == 0.5


def test_without_a_val_split_best_is_on_test_and_says_so(tiny_argv, capsys):
    final = main(tiny_argv("--epochs", "1", "--schedule.warmup_epochs", "1"))
    best = json.loads((Path(final["run_dir"]) / "best" / "model_config.json").read_text())
    assert final["best_selected_on"] == "test_top1" and best["selected_on"] == "test_top1"
    assert final["best_test_top1"] == final["test_top1"] and "val_top1" not in final
    assert "no val split: every evaluation is on test" in capsys.readouterr().out


def test_a_resume_with_another_val_split_is_refused(tiny_argv, capsys):
    # 2 epochs with val = a quarter of the training subjects; a resume asking for another split would train on clips
    # that were val (or hold out clips that trained): refused in one line, before anything runs. The same split
    # resumes.
    first = main(tiny_argv("--epochs", "2", "--schedule.warmup_epochs", "1", "--data.val_fraction", "0.25"))
    meta = json.loads((Path(first["run_dir"]) / "ckpt" / f"step_{first['step']:07d}" / "meta.json").read_text())
    assert meta["val_split"]["source"] == "carved" and meta["val_split"]["seed"] == 0
    for other in (["--data.val_fraction", "0.5", "--train.seed", "1"], ["--data.val_seed", "1"],
                  ["--data.val_fraction", "0"]):
        argv = tiny_argv("--epochs", "3", "--schedule.warmup_epochs", "1", "--data.val_fraction", "0.25",
                         "--resume", "auto", *other)
        with pytest.raises(ConfigError, match="the val split differs") as e:
            main(argv)
        assert "\n" not in str(e.value) and "checkpoint carved (data.val_fraction 0.25, data.val_seed 0" in str(
            e.value)
        assert cli(argv) == 2 and capsys.readouterr().err.count("\n") == 1
    final = main(tiny_argv("--epochs", "3", "--schedule.warmup_epochs", "1", "--data.val_fraction", "0.25",
                           "--resume", "auto"))
    assert final["step"] == 3 * first["step"] // 2 and final["best_selected_on"] == "val_top1"


class StopAtFirst(Callback):
    def __init__(self):
        self.evals = []

    def on_evaluate(self, metrics):
        self.evals.append(metrics)
        return True


def test_a_run_stopped_by_a_callback_still_tests_once(tiny_argv, monkeypatch):
    # a val split, 3 epochs, a callback that stops after the first evaluation (epoch 1): the loop's final evaluation
    # is skipped, yet test is measured once, on the final weights, which are best/'s (the stop was its evaluation)
    calls, weights = _scripted(monkeypatch, [0.5], [0.25])
    stop = StopAtFirst()
    result = train(load_config(tiny_argv("--epochs", "3", "--schedule.warmup_epochs", "1", "--train.eval_every", "1",
                                         "--data.val_fraction", "0.25")), callbacks=[stop])
    assert result.stopped_early and len(stop.evals) == 1 and "test_top1" not in stop.evals[0]
    assert calls == {"val": [], "test": []} and len(weights) == 1             # one test evaluation in all
    run, final = result.run_dir, result.metrics
    steps = json.loads((run / "run_meta.json").read_text())["steps_per_epoch"]
    assert final["step"] == steps and (final["val_top1"], final["test_top1"]) == (0.5, 0.25)
    assert (final["best_val_top1"], final["best_step"], final["best_test_top1"]) == (0.5, steps, 0.25)
    assert json.loads((run / "best" / "model_config.json").read_text())["test_top1"] == 0.25
    tests = [r for r in read_jsonl(run / "metrics.jsonl") if "test_top1" in r]
    assert len(tests) == 1 and tests[0]["step"] == steps
    assert _same(weights[0], load_model(run / "best").state_dict())


def test_a_datasets_val_split_sharing_subjects_is_refused_unless_allowed(tmp_path, tiny_argv, capsys):
    # issue 18: the val split never shares a subject with train or test. s3 is in train and val, s5 in val and test
    root = _dataset(tmp_path / "ds", {"train": ["s0", "s1", "s2", "s3"], "val": ["s3", "s4", "s5"],
                                      "test": ["s5", "s6"]})
    with pytest.raises(ConfigError, match="shares subjects with other splits") as e:
        val_split(load_config(["--data.num_workers", "0"]).data, root)
    assert "\n" not in str(e.value) and "train: s3 (1)" in str(e.value) and "test: s5 (1)" in str(e.value)
    assert cli(tiny_argv("--data", root, "--epochs", "1", "--schedule.warmup_epochs", "0")) == 2   # nothing trains
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data.allow_val_overlap true" in err
    val = val_split(load_config(["--data.num_workers", "0", "--data.allow_val_overlap", "true"]).data, root)
    assert val.source == "dataset" and val.shared == {"train": ["s3"], "test": ["s5"]}   # used, with the warning
