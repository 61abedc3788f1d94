"""What `msf-scale tune` checks before Ray starts (no Ray runtime needed): the search spaces of every size, their
values as the config loader reads them back, and the val split: a dataset without one is refused unless a val
fraction carves one, and a trial's dataset (the tuning view) holds no test data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from msf_scale.config import SIZES, ConfigError, UserPathError, load_config
from msf_scale.data import read_dataset_info
from msf_scale.data.splits import read_subjects
from msf_scale.tune import (SearchOptions, _setup_search, fmt_value, load_space, params_argv, preflight, run_search,
                            space_file)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("variant", ["msf_mamba", "msf_mamba_plus", "videomamba"])
def test_every_size_has_a_space_whose_values_all_build(size, variant):
    space = load_space(size, variant)
    assert Path(space.path) == space_file(size)
    assert {"optim.lr", "optim.weight_decay", "model.drop_path_rate", "schedule.warmup_epochs",
            "train.batch_size"} <= set(space.params)
    assert space.params["optim.lr"] and "loguniform" in space.params["optim.lr"]
    fusion = {k for k in space.params if k.startswith("model.arch.fusion")}
    assert bool(fusion) == (variant != "videomamba")        # fusion options only where the variant fuses
    preflight(["--size", size, "--variant", variant], space)  # every choice / range end: a config and a model


def test_sampled_values_reach_the_config_as_sampled():
    params = {"optim.lr": 0.0123, "model.arch.fusion_scales": [3, 5], "model.arch.fusion_theta_learnable": True,
              "model.arch.fusion_blocks": "every_2", "schedule.warmup_epochs": 2, "train.batch_size": 16}
    cfg = load_config(["--size", "tiny", "--variant", "msf_mamba_plus", *params_argv(params)])
    assert cfg.optim.lr == 0.0123 and cfg.schedule.warmup_epochs == 2 and cfg.train.batch_size == 16
    assert cfg.model.arch == {"fusion_scales": [3, 5], "fusion_theta_learnable": True, "fusion_blocks": "every_2"}
    assert fmt_value(None) == "null" and fmt_value(False) == "false" and fmt_value((3, 5, 7)) == "[3, 5, 7]"


def test_bad_spaces_are_refused(space_file):
    with pytest.raises(ConfigError, match="not a config key"):
        load_space("tiny", "msf_mamba", space_file("space:\n  optim.lrr: {uniform: [0, 1]}\n"))
    with pytest.raises(ConfigError, match="one distribution"):
        load_space("tiny", "msf_mamba", space_file("space:\n  optim.lr: {normal: [0, 1]}\n"))
    with pytest.raises(ConfigError, match="low > 0"):
        load_space("tiny", "msf_mamba", space_file("space:\n  optim.lr: {loguniform: [0, 1]}\n"))
    bad = load_space("tiny", "msf_mamba", space_file("space:\n  schedule.warmup_epochs: {choice: [0, 80]}\n"))
    with pytest.raises(ConfigError, match="warmup_epochs=80 does not give a valid run"):
        preflight(["--size", "tiny"], bad)                  # 80 > the 50 epochs of the schedule
    arch = load_space("tiny", "msf_mamba", space_file("space:\n  model.arch.fusion_blocks: {choice: [all, some]}\n"))
    with pytest.raises(ConfigError, match="fusion_blocks=some"):
        preflight(["--size", "tiny"], arch)


def _opts(tmp_path, tiny_sets, *extra_sets, **kw):
    return SearchOptions(size="tiny", sets=[*tiny_sets, *extra_sets], storage=str(tmp_path / "runs"),
                         num_samples=1, **kw)


def test_no_val_split_and_no_fraction_is_refused(tmp_path, tiny_sets, space_file):
    with pytest.raises(ConfigError, match="selects on the test split .* refused"):
        _setup_search(_opts(tmp_path, tiny_sets, space=space_file()))
    assert not (tmp_path / "runs" / "tune_msf_mamba_tiny").exists()   # nothing half-made is left to --resume
    with pytest.raises(UserPathError, match="holds no search"):
        run_search(_opts(tmp_path, tiny_sets, space=space_file(), resume=True))


def _links(view: Path) -> dict[str, str]:
    return {p.name: os.readlink(p) for p in view.glob("*.tar")}


def test_carved_val_split_is_subject_independent_and_trials_see_no_test(tmp_path, tiny_sets, space_file):
    setup = _setup_search(_opts(tmp_path, tiny_sets, space=space_file(), val_fraction=0.25))
    view, carved = Path(setup["view"]), Path(setup["data"]["carved"])
    original = setup["data"]["root"]
    subj = {s: set(read_subjects(carved, s).values()) for s in ("train", "val")}
    test_subjects = set(read_subjects(original, "test").values())
    assert subj["val"] and not subj["val"] & subj["train"] and not subj["val"] & test_subjects
    assert sorted(subj["val"]) == setup["data"]["val_subjects"]
    links = _links(view)
    orig_test = {str(Path(original, s).resolve()) for s in read_dataset_info(original).splits["test"].shards}
    assert not orig_test & set(links.values())                    # the real test shards are not in the view
    assert all(Path(t).name.startswith("val-") for n, t in links.items() if n.startswith("test-"))
    assert read_dataset_info(view).splits["test"].num_samples == read_dataset_info(carved).splits["val"].num_samples
    assert "--data" in setup["argv"] and str(view) in setup["argv"]
    with pytest.raises(ConfigError, match="already holds a search"):
        _setup_search(_opts(tmp_path, tiny_sets, space=space_file(), val_fraction=0.25))


def test_dataset_val_split_is_used_as_it_is(tmp_path, tiny_sets, space_file):
    setup = _setup_search(_opts(tmp_path, tiny_sets, "data.synth.val_subjects=2", space=space_file()))
    links = _links(Path(setup["view"]))
    root = Path(setup["data"]["root"]).resolve()
    assert setup["data"]["val"] == "the dataset's own val split"
    assert {Path(t).name for n, t in links.items() if n.startswith("test-")} == {
        Path(t).name for n, t in links.items() if n.startswith("val-")}
    assert all(Path(t).parent == root and not Path(t).name.startswith("test-") for t in links.values())
