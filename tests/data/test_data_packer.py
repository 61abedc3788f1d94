"""Packer: good clips become shards; every bad row is reported in rejected.csv, never a crash or a silent loss."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from msf_scale.data import build_eval_loader, pack, read_dataset_info
from msf_scale.data.video import decode_mp4, encode_mp4


def _write_mp4(path, frames: int, h: int, w: int, seed: int, faststart: bool = False) -> np.ndarray:
    import av

    video = np.random.default_rng(seed).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)
    video = (video // 64 * 64).astype(np.uint8)  # blocky values survive H.264 well enough
    if not faststart:
        path.write_bytes(encode_mp4(video, fps=10))
        return video
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for f in video:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return video


@pytest.fixture
def messy(tmp_path):
    """12 good clips of 3 classes and 4 subjects, plus a missing, a corrupt, a truncated, a zero-frame clip
    and an empty label."""
    import av

    vids = tmp_path / "videos"
    (vids / "sub").mkdir(parents=True)
    rows = [("path", "label", "subject")]
    for i in range(12):
        _write_mp4(vids / "sub" / f"good{i}.mp4", 12 + i, 24, 32, seed=i)
        rows.append((f"sub/good{i}.mp4", ["wave", "nod", "shrug"][i % 3], f"p{i % 4}"))
    (vids / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    _write_mp4(vids / "full.mp4", 40, 24, 32, seed=99, faststart=True)
    data = (vids / "full.mp4").read_bytes()
    (vids / "truncated.mp4").write_bytes(data[: len(data) // 2])
    with av.open(str(vids / "zero.mp4"), "w") as c:  # a container with a header and no frame
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = 32, 24, "yuv420p"
        c.start_encoding()
    rows += [("missing.mp4", "wave", "p0"), ("corrupt.mp4", "nod", "p1"), ("truncated.mp4", "wave", "p2"),
             ("zero.mp4", "shrug", "p3"), ("sub/good0.mp4", "", "p0")]
    ann = tmp_path / "ann.csv"
    with open(ann, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return vids, ann


def test_rejected_csv_lists_every_bad_row(messy, tmp_path, capsys):
    vids, ann = messy
    out = tmp_path / "out"
    result = pack(vids, ann, out, frames=8, size=16, shard_size=4, workers=2, progress=False)
    assert result.packed == 12 and result.rejected == 5
    with open(out / "rejected.csv") as f:
        rejected = {r["path"]: r["reason"] for r in csv.DictReader(f)}
    assert set(rejected) == {"missing.mp4", "corrupt.mp4", "truncated.mp4", "zero.mp4", "sub/good0.mp4"}
    assert rejected["missing.mp4"].startswith("missing file")
    assert rejected["corrupt.mp4"].startswith("unreadable")
    assert rejected["truncated.mp4"].startswith("truncated")
    assert rejected["zero.mp4"].startswith("zero frames")
    assert rejected["sub/good0.mp4"] == "empty label"
    printed = capsys.readouterr().out
    assert "rejected 5" in printed and printed.count("rejected line") == 5

    info = read_dataset_info(out)
    assert info.class_names == ["nod", "shrug", "wave"] and info.format == "mp4"
    assert (info.num_frames, info.height, info.width) == (8, 16, 22)  # short side 16, long side 21.3 -> even
    assert sum(s.num_samples for s in info.splits.values()) == 12
    assert set(info.splits) == {"train", "test"}


def test_subject_split_is_disjoint_and_labels_round_trip(messy, tmp_path):
    vids, ann = messy
    out = tmp_path / "out"
    pack(vids, ann, out, size=16, fmt="npy", shard_size=5, progress=False)
    info = read_dataset_info(out)
    assert info.num_frames is None, "clips keep their own lengths without --frames"
    subjects, labels = {}, {}
    from msf_scale.data.streams import ErrorLog, read_samples
    import json

    for split in info.splits:
        for s in read_samples(iter(info.shard_paths(split)), ErrorLog()):
            meta = json.loads(s["json"])
            subjects.setdefault(split, set()).add(meta["subject"])
            labels[meta["source"]] = (int(s["cls"]), meta["label_name"], meta["num_frames"])
    assert not subjects["train"] & subjects["test"]
    for i in range(12):
        idx, name, frames = labels[f"sub/good{i}.mp4"]
        assert name == ["wave", "nod", "shrug"][i % 3] and info.class_names[idx] == name
        assert frames == 12 + i
    keys = [k for _, _, ks in build_eval_loader(out, "train", batch_size=4, num_frames=4, img_size=16) for k in ks]
    assert len(keys) == info.splits["train"].num_samples


def test_index_labels_split_column_and_frames_kept(tmp_path):
    vids = tmp_path / "v"
    vids.mkdir()
    originals = {}
    rows = [("path", "label", "split")]
    for i in range(5):
        originals[f"c{i}.mp4"] = _write_mp4(vids / f"c{i}.mp4", 6, 16, 16, seed=i)
        rows.append((f"c{i}.mp4", str(i % 3), ["train", "train", "val", "test", "bogus"][i]))
    ann = tmp_path / "a.csv"
    with open(ann, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    result = pack(vids, ann, tmp_path / "out", progress=False)
    info = result.info
    assert result.rejected == 1 and info.class_names == ["class_0", "class_1", "class_2"]
    assert {s: v.num_samples for s, v in info.splits.items()} == {"train": 2, "val": 1, "test": 1}
    assert (info.num_frames, info.height, info.width) == (6, 16, 16)
    from msf_scale.data.streams import ErrorLog, read_samples

    for s in read_samples(iter(info.shard_paths("train")), ErrorLog()):
        assert decode_mp4(s["mp4"]).shape == (6, 16, 16, 3)
    assert "bad split" in (tmp_path / "out" / "rejected.csv").read_text()


def test_pack_input_errors(messy, tmp_path):
    vids, ann = messy
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na.mp4,x\n")
    with pytest.raises(ValueError, match="needs the columns 'path' and 'label'"):
        pack(vids, bad, tmp_path / "o1", progress=False)
    with pytest.raises(FileNotFoundError, match="--videos"):
        pack(tmp_path / "nope", ann, tmp_path / "o2", progress=False)
    only_bad = tmp_path / "only_bad.csv"
    only_bad.write_text("path,label\nmissing.mp4,x\n")
    with pytest.raises(ValueError, match="no clip .* could be packed"):
        pack(vids, only_bad, tmp_path / "o3", progress=False)
    assert (tmp_path / "o3" / "rejected.csv").is_file()
    pack(vids, ann, tmp_path / "o4", frames=4, size=8, progress=False)
    with pytest.raises(ValueError, match="already holds a dataset"):
        pack(vids, ann, tmp_path / "o4", progress=False)


def test_segments_of_a_long_video(tmp_path):
    """start/end columns cut annotated segments out of one recording (seeking across keyframes), exactly."""
    import av

    from msf_scale.data.streams import ErrorLog, read_samples
    from msf_scale.data.video import read_video_file

    vids = tmp_path / "v"
    vids.mkdir()
    video = (np.random.default_rng(0).integers(0, 4, (60, 16, 24, 3)) * 60).astype(np.uint8)
    with av.open(str(vids / "long.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt, s.options = 24, 16, "yuv420p", {"g": "7"}  # a keyframe every 7 frames
        for f in video:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    full, _ = read_video_file(vids / "long.mp4")
    rows = [("path", "label", "subject", "split", "start", "end"),
            ("long.mp4", "a", "p1", "train", "0", "10"), ("long.mp4", "b", "p1", "train", "20", "35"),
            ("long.mp4", "a", "p1", "train", "50", ""), ("long.mp4", "b", "p1", "train", "9", "3"),
            ("long.mp4", "a", "p1", "train", "70", "80"), ("long.mp4", "b", "p1", "train", "x", "")]
    with open(tmp_path / "a.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    result = pack(vids, tmp_path / "a.csv", tmp_path / "out", fmt="npy", progress=False)
    assert result.packed == 3 and result.rejected == 3
    reasons = (tmp_path / "out" / "rejected.csv").read_text()
    assert reasons.count("bad segment") == 2 and "zero frames in [70, 80)" in reasons
    from msf_scale.data.schema import load_npy
    import json

    for s in read_samples(iter(result.info.shard_paths("train")), ErrorLog()):
        start, end = json.loads(s["json"])["segment"]
        np.testing.assert_array_equal(load_npy(s["npy"]), full[start:end])
