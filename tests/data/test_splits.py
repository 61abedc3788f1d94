"""Validation splits (issue 18): the synthetic val split, the seeded subject-independent carve-out and the split
listing. The val split must never share a subject with train or test, and the carve-out is a pure function of
(subjects, fraction, seed)."""
from __future__ import annotations

import filecmp
import json
import shutil

import pytest

from msf_scale.data import build_eval_loader, read_dataset_info, synthesize
from msf_scale.data.splits import (carve_val, choose_val_subjects, dataset_splits, has_split, materialize_val_split,
                                   read_subjects)
from msf_scale.data.synthetic import synth_config

SMALL = dict(train_per_class=3, test_per_class=2, num_frames=4, size=16, shard_size=7)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A synthetic dataset as made before val splits existed: train and test only (12 + 4 subjects)."""
    return synthesize(tmp_path_factory.mktemp("plain") / "ds", workers=1, **(SMALL | {"train_per_class": 12}))


def test_synthetic_val_split_exists_when_asked_and_shares_no_subject(tmp_path):
    # enough clips per class that every subject of every split appears (a split's clips cycle through its subjects)
    root = synthesize(tmp_path / "v", workers=1, val_subjects=3, val_per_class=6,
                      **(SMALL | {"train_per_class": 10, "test_per_class": 4}))
    info = read_dataset_info(root)
    assert dataset_splits(root) == ["train", "val", "test"]
    assert info.splits["val"].num_samples == 8 * 6 and info.splits["train"].num_samples == 8 * 10
    subj = {s: set(read_subjects(root, s).values()) for s in ("train", "val", "test")}
    # 16 subjects: train s000-s008, val s009-s011, test s012-s015
    assert subj["val"] == {"s009", "s010", "s011"}
    assert subj["train"] == {f"s{i:03d}" for i in range(9)} and subj["test"] == {f"s{i:03d}" for i in range(12, 16)}
    assert not subj["val"] & subj["train"] and not subj["val"] & subj["test"] and not subj["train"] & subj["test"]
    labels = sorted(json.loads(x)["label"] for x in _json_members(root, "val"))
    assert labels == sorted(list(range(8)) * 6)            # six clips per class
    loader = build_eval_loader(root, "val", batch_size=8, num_frames=4, img_size=16)
    assert sum(len(y) for _, y, _ in loader) == 48         # the loaders read it like any split
    # asking for a val split changes neither the test clips nor the digest of a dataset without one
    assert synth_config(**SMALL).digest() != synth_config(val_subjects=3, **SMALL).digest()


def _shards_equal(a, b) -> bool:
    names = [s for v in read_dataset_info(a).splits.values() for s in v.shards]
    return names == [s for v in read_dataset_info(b).splits.values() for s in v.shards] and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def _json_members(root, split):
    import tarfile
    for shard in read_dataset_info(root).shard_paths(split):
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    yield tar.extractfile(m).read()


def test_default_writes_no_val_split_and_keeps_existing_datasets(plain, tmp_path):
    assert dataset_splits(plain) == ["train", "test"] and not has_split(plain, "val")
    assert read_dataset_info(plain).source["val_subjects"] == 0
    # the digests (cache directories) of the defaults and the micro preset, as computed before val splits existed
    assert synth_config().digest() == "97ad840fbcef" and synth_config("micro").digest() == "3d6039b8c055"
    again = synthesize(tmp_path / "again", workers=1, val_subjects=0, **(SMALL | {"train_per_class": 12}))
    assert _shards_equal(plain, again)
    with pytest.raises(ValueError, match="val_subjects"):
        synth_config(subjects=6, test_subjects=2, val_subjects=4)    # no training subject left


def test_carve_is_subject_independent_deterministic_and_bounded():
    subject_of = {f"k{i:03d}": f"s{i % 10}" for i in range(100)}
    a = carve_val(subject_of, 0.2, seed=3)
    assert a == carve_val(dict(reversed(list(subject_of.items()))), 0.2, seed=3)   # not the reading order
    assert len(a.val_subjects) == 2 and not set(a.val_subjects) & set(a.train_subjects)
    assert a.val_keys | a.train_keys == set(subject_of) and not a.val_keys & a.train_keys
    assert all(subject_of[k] in a.val_subjects for k in a.val_keys)
    assert {carve_val(subject_of, 0.2, seed=s).val_subjects for s in range(8)} != {a.val_subjects}  # seeded
    assert len(choose_val_subjects(["a", "b", "c"], 0.01)) == 1        # at least one subject
    assert len(choose_val_subjects(["a", "b"], 0.99)) == 1             # never all of them
    with pytest.raises(ValueError, match="at least 2"):
        choose_val_subjects(["only"], 0.5)
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        choose_val_subjects(["a", "b"], 0.0)


def test_materialized_carve_shares_no_subject_with_train_or_test(plain, tmp_path):
    out, carve = materialize_val_split(plain, tmp_path / "carved", fraction=0.25, seed=1)
    assert dataset_splits(out) == ["train", "val", "test"]
    subj = {s: set(read_subjects(out, s).values()) for s in ("train", "val", "test")}
    assert subj["val"] == set(carve.val_subjects) and len(subj["val"]) == 3    # 25% of 12 training subjects
    assert not subj["val"] & subj["train"] and not subj["val"] & subj["test"]
    keys = {s: set(read_subjects(out, s)) for s in ("train", "val")}
    assert keys["train"] | keys["val"] == set(read_subjects(plain, "train")) and not keys["train"] & keys["val"]
    info = read_dataset_info(out)
    assert info.splits["test"] == read_dataset_info(plain).splits["test"]        # test linked, not rewritten
    assert info.source["val_carve"]["val_subjects"] == list(carve.val_subjects)
    again, carve2 = materialize_val_split(plain, tmp_path / "carved2", fraction=0.25, seed=1)
    assert carve2 == carve and all(filecmp.cmp(out / s, again / s, shallow=False)
                                   for s in info.splits["val"].shards + info.splits["train"].shards)
    with pytest.raises(ValueError, match="already has a val split"):
        materialize_val_split(out, tmp_path / "twice", fraction=0.25)


def test_splits_from_shard_names_without_dataset_json(plain, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for p in plain.glob("*.tar"):
        shutil.copy(p, bare / p.name)
    (bare / "val-000000.tar").write_bytes((plain / "test-000000.tar").read_bytes())
    assert dataset_splits(bare) == ["train", "val", "test"]
