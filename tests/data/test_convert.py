"""`msf-scale data convert imigue|smg`: fixture trees in the releases' annotation layouts -> the packer's CSV, and
the CSV packs (segments, labels, splits)."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from msf_scale import cli
from msf_scale.config import UserError
from msf_scale.data.convert import convert


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def imigue_tree(tmp_path):
    """Two videos under the train folder, one under the validate folder, as the MiGA iMiGUE release lays them."""
    root = tmp_path / "iMiGUE"
    _write(root / "imigue_skeleton_train" / "0001" / "0001_label.csv", "5,10,19\n12,40,47\n")
    _write(root / "imigue_skeleton_train" / "0007" / "0007_label.csv", "99,3,8\n")
    _write(root / "imigue_skeleton_validate" / "0298" / "0298_label.csv", "1,0,5\n\n")
    _write(root / "imigue_skeleton_train" / "0001" / "0001_light_hand.csv", "not annotations\n")
    return root


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_imigue_layout_to_packer_csv(imigue_tree, tmp_path):
    out = tmp_path / "imigue.csv"
    assert convert("imigue", imigue_tree, out) == 4
    rows = _read(out)
    assert list(rows[0]) == ["path", "label", "subject", "split", "start", "end"]
    assert rows[0] == {"path": "0001.mp4", "label": "4", "subject": "0001", "split": "train", "start": "10",
                       "end": "20"}                                     # id 5 -> index 4; inclusive end 19 -> 20
    assert (rows[2]["label"], rows[2]["subject"]) == ("31", "0007")     # the non-MG id 99 is class 32
    assert (rows[3]["split"], rows[3]["path"], rows[3]["end"]) == ("test", "0298.mp4", "6")


def test_smg_layout_to_packer_csv_with_names_and_cross_subject_split(tmp_path):
    root = tmp_path / "SMG"
    _write(root / "Sample0003" / "Sample0003_finelabels.csv", "17,100,150\n2,160,170\n")
    _write(root / "Sample0037" / "Sample0037_finelabels.csv", "1,5,25\n")
    names = tmp_path / "names.txt"
    _write(names, "\n".join(f"mg{i}" for i in range(1, 18)) + "\n")
    out = tmp_path / "smg.csv"
    assert convert("smg", root, out, class_names=names) == 3
    rows = _read(out)
    assert rows[0] == {"path": "Sample0003/Sample0003_color.mp4", "label": "mg17", "subject": "Sample0003",
                       "split": "train", "start": "100", "end": "150"}  # end exclusive as in their loader
    assert (rows[2]["split"], rows[2]["label"]) == ("test", "mg1")      # participants 36-40 test
    assert convert("smg", root, out, test_subjects="3") == 3 and _read(out)[0]["split"] == "test"


def test_bad_trees_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="no <id>/<id>_label.csv"):
        convert("imigue", tmp_path, tmp_path / "x.csv")
    _write(tmp_path / "a" / "Sample0001" / "Sample0001_finelabels.csv", "x,1,2\n")
    with pytest.raises(UserError, match="expected class_id,start,end"):
        convert("smg", tmp_path / "a", tmp_path / "x.csv")


def test_cli_convert_then_pack_gives_the_segments(imigue_tree, tmp_path, capsys):
    from msf_scale.data import read_dataset_info
    from msf_scale.data.packer import pack
    from msf_scale.data.video import encode_mp4

    videos = tmp_path / "videos"
    videos.mkdir()
    for sample, n in (("0001", 60), ("0007", 12), ("0298", 8)):
        frames = np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
        (videos / f"{sample}.mp4").write_bytes(encode_mp4(frames, fps=10))
    out = tmp_path / "imigue.csv"
    assert cli.main(["data", "convert", "imigue", "--annotations", str(imigue_tree), "--out", str(out),
                     "--video", "{sample}.mp4"]) == 0
    assert "wrote 4 segments" in capsys.readouterr().out
    pack(videos, out, tmp_path / "packed", fmt="npy")
    info = read_dataset_info(tmp_path / "packed")
    assert (info.splits["train"].num_samples, info.splits["test"].num_samples) == (3, 1)
    assert info.num_classes == 32
    import json
    import tarfile
    segments = set()
    for shard in info.shard_paths("train"):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    segments.add((meta["source"], tuple(meta["segment"]), meta["num_frames"]))
    assert segments == {("0001.mp4", (10, 20), 10), ("0001.mp4", (40, 48), 8), ("0007.mp4", (3, 9), 6)}
    assert cli.main(["data", "convert", "imigue", "--annotations", str(tmp_path / "none"), "--out", str(out)]) == 2
