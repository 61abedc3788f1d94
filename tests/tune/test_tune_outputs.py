"""What a search writes and hands its trials, without a Ray runtime: the trials table gives val top-1 in percent,
as the curves plot it (the CSV keeps the fraction of metrics.jsonl), and a trial's training run evaluates the view's
val split, with no test evaluation and no second carve-out."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from msf_scale.config import load_config
from msf_scale.data.builders import val_split
from msf_scale.data.splits import plan_carve, read_subjects
from msf_scale import tune
from msf_scale.tune import TRIAL_FIXED, SearchOptions, _setup_search, write_tables

ROWS = [{"trial": "a_00000", "status": "completed", "optim.lr": 0.004035, "val_top1": 0.125, "best_val_top1": 0.1667,
         "epochs": 4, "starts": 1, "error": ""},
        {"trial": "a_00001", "status": "failed", "optim.lr": 0.05, "val_top1": None, "best_val_top1": None,
         "epochs": 0, "starts": 2, "error": "ValueError: x | y"}]


def test_trials_md_gives_val_top1_in_percent_like_the_plot(tmp_path):
    write_tables(tmp_path, ROWS, ["optim.lr"])
    md = (tmp_path / "trials.md").read_text().splitlines()
    assert md[0] == ("| trial | status | optim.lr | val top-1 (%) | best val top-1 (%) | epochs | starts | error |")
    assert md[2].startswith("| a_00000 | completed | 0.004035 | 12.5 | 16.7 | 4 | 1 |")
    assert md[3].startswith("| a_00001 | failed | 0.05 |  |  | 0 | 2 |") and "x \\| y" in md[3]
    rows = list(csv.DictReader(open(tmp_path / "trials.csv")))
    assert rows[0]["val_top1"] == "0.125" and rows[0]["best_val_top1"] == "0.1667"   # the CSV: a fraction


def _opts(tmp_path, tiny_sets, *extra, **kw):
    return SearchOptions(size="tiny", sets=[*tiny_sets, *extra], storage=str(tmp_path / "runs"), num_samples=1, **kw)


def test_a_trial_evaluates_the_views_val_split_and_never_test(tmp_path, tiny_sets, space_file):
    # the carve-out asked for through the config field (what --set data.val_fraction gives) rather than --val-fraction
    setup = _setup_search(_opts(tmp_path, tiny_sets, "data.val_fraction=0.25", space=space_file()))
    assert setup["data"]["val"].startswith("carved from train")
    cfg = load_config([*setup["argv"], *TRIAL_FIXED])
    assert cfg.data.val_fraction == 0 and cfg.train.final_test is False and cfg.train.eval_every == 1
    val = val_split(cfg.data, cfg.data.root)
    assert val.source == "dataset" and not val.shared          # the view's own val split, no warning about its test
    assert Path(cfg.data.root) == Path(setup["view"])


def _best_config(setup, monkeypatch) -> Path:
    """best_config.yaml as the end of a search writes it (write_outputs), for one completed trial."""
    row = {"trial": "x_00000", "status": "completed", "val_top1": 0.5, "best_val_top1": 0.5, "epochs": 1, "starts": 1,
           "error": "", "history": [(1, 0.5)], "dir": "", "optim.lr": 0.01}
    monkeypatch.setattr(tune, "collect_trials", lambda exp, setup: [dict(row)])
    exp = Path(setup["view"]).parent
    tune.write_outputs(exp, {**setup, "space": {"optim.lr": setup["space"]["optim.lr"]}})
    return exp / tune.BEST_YAML


@pytest.mark.parametrize("how", ["flag", "set"])
def test_best_config_carves_the_val_subjects_the_search_selected_on(tmp_path, tiny_sets, space_file, how,
                                                                   monkeypatch):
    # --val-fraction is not in the presets: best_config.yaml must carry it (and the carve's seed), or training the
    # best config would have no val split and select best/ on test
    extra, kw = (["data.val_seed=3"], {"val_fraction": 0.25}) if how == "flag" else (
        ["data.val_fraction=0.25", "data.val_seed=3"], {})
    setup = _setup_search(_opts(tmp_path, tiny_sets, *extra, space=space_file(), **kw))
    cfg = load_config(["--config", str(_best_config(setup, monkeypatch))])
    assert (cfg.data.val_fraction, cfg.data.val_seed, cfg.optim.lr) == (0.25, 3, 0.01)
    val = val_split(cfg.data, setup["data"]["root"])                    # what train.py carves from the config
    assert val.source == "carved" and list(val.subjects) == setup["data"]["val_subjects"]
    carved = set(read_subjects(setup["data"]["carved"], "val"))          # the search's val clips, key for key
    assert val.carve.val_keys == carved
    assert plan_carve(setup["data"]["root"], 0.25, 0)[0].val_subjects != val.subjects   # the seed matters here


def test_best_config_of_a_dataset_with_its_own_val_split_asks_for_no_carve(tmp_path, tiny_sets, space_file,
                                                                           monkeypatch):
    setup = _setup_search(_opts(tmp_path, tiny_sets, "data.synth.val_subjects=2", "data.val_fraction=0.25",
                                space=space_file()))
    cfg = load_config(["--config", str(_best_config(setup, monkeypatch))])
    assert cfg.data.val_fraction == 0 and val_split(cfg.data, setup["data"]["root"]).source == "dataset"
