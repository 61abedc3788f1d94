"""The `data` CLI command, driven through a tiny argparse harness as cli.py wires it."""
from __future__ import annotations

import argparse
import csv

import numpy as np
import pytest

from msf_scale.data import read_dataset_info
from msf_scale.data.commands import add_data_parser
from msf_scale.data.synthetic import SynthConfig


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="msf-scale")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_synth_flags_reach_the_generator(tmp_path, capsys):
    out = tmp_path / "s"
    code = _run(["data", "synth", "--out", str(out), "--classes", "5", "--train-per-class", "3",
                 "--test-per-class", "2", "--frames", "6", "--size", "20", "--seed", "7", "--subjects", "6",
                 "--test-subjects", "2", "--motion-px", "3", "--object-px", "5", "--drift-px", "1",
                 "--distractors", "1", "--noise-std", "2", "--texture", "30", "--format", "mp4",
                 "--shard-size", "4"])
    assert code == 0 and "wrote" in capsys.readouterr().out
    info = read_dataset_info(out)
    expected = SynthConfig(num_classes=5, train_per_class=3, test_per_class=2, num_frames=6, size=20, seed=7,
                           subjects=6, test_subjects=2, motion_px=3, object_px=5, drift_px=1, distractors=1,
                           noise_std=2, texture=30, format="mp4", shard_size=4)
    assert {k: v for k, v in info.source.items() if k in expected.__dataclass_fields__} == expected.__dict__
    assert info.splits["train"].num_samples == 15 and len(info.splits["train"].shards) == 4


def test_synth_defaults_come_from_synthconfig(tmp_path):
    parser = argparse.ArgumentParser()
    add_data_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "synth", "--out", str(tmp_path)])
    assert args.num_classes is None and args.motion_px is None  # None: SynthConfig's default applies
    help_text = parser._subparsers._group_actions[0].choices["data"].format_help()
    assert "synth" in help_text and "pack" in help_text


def test_synth_bad_value_is_an_error_not_a_traceback(tmp_path, capsys):
    assert _run(["data", "synth", "--out", str(tmp_path), "--classes", "40"]) == 2
    assert "num_classes" in capsys.readouterr().out


def test_pack_command(tmp_path, capsys):
    from msf_scale.data.video import encode_mp4

    vids = tmp_path / "v"
    vids.mkdir()
    rows = [("path", "label", "subject")]
    for i in range(4):
        video = np.random.default_rng(i).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
        (vids / f"{i}.mp4").write_bytes(encode_mp4(video, fps=5))
        rows.append((f"{i}.mp4", "ab"[i % 2], f"s{i}"))
    rows.append(("gone.mp4", "a", "s0"))
    with open(tmp_path / "a.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = tmp_path / "o"
    code = _run(["data", "pack", "--videos", str(vids), "--annotations", str(tmp_path / "a.csv"), "--out", str(out),
                 "--frames", "4", "--size", "8", "--shard-size", "2", "--workers", "1", "--format", "npy",
                 "--no-flip", "--name", "tiny"])
    assert code == 0
    info = read_dataset_info(out)
    assert info.name == "tiny" and info.flip_ok is False and info.format == "npy" and info.num_frames == 4
    assert "rejected 1" in capsys.readouterr().out
    assert _run(["data", "pack", "--videos", str(vids), "--annotations", str(tmp_path / "a.csv"),
                 "--out", str(out)]) == 2, "an existing dataset is refused with a message"


def test_pack_requires_its_inputs():
    with pytest.raises(SystemExit):
        _run(["data", "pack", "--videos", "x"])
