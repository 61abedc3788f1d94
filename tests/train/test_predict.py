"""`msf-scale predict`: top-k of video files through the run's own test-time pipeline."""
from __future__ import annotations

import json

import numpy as np
import torch

import msf_scale.train as train_mod
from msf_scale import predict
from msf_scale.export import load_model
from msf_scale.data import build_eval_loader
from msf_scale.data.schema import DatasetInfo, ShardSink, make_sample, npy_bytes, write_dataset_info
from msf_scale.data.video import encode_mp4


def test_predict_matches_the_eval_pipeline_and_prints_topk(tiny_argv, tmp_path, capsys):
    train_mod.main(tiny_argv("--max-steps", "2", "--data.num_clips", "2", "--data.num_crops", "3"))
    run = tmp_path / "run"
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (11, 40, 56, 3), dtype=np.uint8)   # not square, not T frames: views differ
    np.save(tmp_path / "clip.npy", clip)
    # the same clip as a one-sample test set, through the eval loader: what `msf-scale eval` would see
    root = tmp_path / "one"
    root.mkdir()
    sink = ShardSink(root, "test", 8)
    sink.write(make_sample("k0", 0, npy_bytes(clip), "npy", {"label": 0}))
    meta = json.loads((run / "model_config.json").read_text())
    write_dataset_info(root, DatasetInfo(name="one", num_classes=8, class_names=meta["class_names"],
                                         splits={"test": sink.close()}, num_frames=11, height=40, width=56,
                                         flip_ok=False))
    video, _, _ = next(iter(build_eval_loader(root, batch_size=1, num_frames=4, img_size=32, num_clips=2,
                                              num_crops=3)))
    model = load_model(run)
    with torch.no_grad():
        expected = model(video[0]).softmax(-1).mean(0)
    views = predict.clip_views(clip, 4, 32, 2, 3)
    assert torch.equal(views, video[0])
    capsys.readouterr()
    out_json = tmp_path / "pred.json"
    assert predict.main([str(tmp_path / "clip.npy"), "--ckpt", str(run), "--topk", "3", "--json", str(out_json)]) == 0
    res = json.loads(out_json.read_text())[0]
    assert res["views"] == 6 and len(res["top"]) == 3
    top = expected.topk(3)
    assert [r["index"] for r in res["top"]] == top.indices.tolist()
    assert np.allclose([r["prob"] for r in res["top"]], top.values.numpy(), atol=1e-6)
    assert [r["class"] for r in res["top"]] == [meta["class_names"][i] for i in top.indices.tolist()]
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{tmp_path / 'clip.npy'}: {res['top'][0]['class']} ")


def test_predict_reads_video_files_and_reports_bad_ones(tiny_argv, tmp_path, capsys):
    train_mod.main(tiny_argv("--max-steps", "1"))
    mp4 = tmp_path / "clip.mp4"
    mp4.write_bytes(encode_mp4(np.random.default_rng(1).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), fps=10))
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    capsys.readouterr()
    assert predict.main([str(mp4), str(tmp_path / "bad.mp4"), "--ckpt", str(tmp_path / "run" / "best"),
                         "--start", "2", "--end", "10"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{mp4}: ") and len(captured.out.split()) == 1 + 2 * 5
    assert "bad.mp4: cannot read" in captured.err
    assert predict.main([str(mp4), "--ckpt", str(tmp_path / "nowhere")]) == 2
