"""The latency harness on CPU with tiny models: well-formed CSV/JSON, the statistics, the modes; GPU-marked:
CUDA-graph replay and torch.compile give the eager forward's logits. No timing is asserted (that is benchmarks/)."""
import csv
import json

import numpy as np
import pytest
import torch

from msf_scale import cli, latency
from msf_scale.inference import build_runner
from msf_scale.models import create_model

TINY = dict(num_classes=8, num_frames=4, img_size=32, depth=2, patch_size=16)


@pytest.mark.parametrize("q", [0, 10, 50, 90, 100])
def test_percentile_is_numpys_linear_one(q):
    xs = list(np.random.default_rng(0).exponential(size=53))
    assert latency.percentile(xs, q) == pytest.approx(np.percentile(xs, q))


def test_measure_model_rows_for_clip_video_and_throughput():
    model = create_model("msf_mamba_plus", size="tiny", **TINY)
    rows = latency.measure_model(model, "msf_mamba_plus_tiny", "msf_mamba_plus", "tiny", "registry",
                                 torch.device("cpu"), ["eager"], views=3, throughput_batch=4, runs=7, warmup=1,
                                 dtype=None, throughput_runs=3)
    assert [(r.measure, r.batch, r.runs) for r in rows] == [("clip", 1, 7), ("video", 3, 7), ("throughput", 4, 3)]
    for r in rows:
        assert r.input == "3 x 4 x 32 x 32" and r.dtype == "fp32" and r.device == "cpu"
        assert 0 < r.min_ms <= r.median_ms <= r.p90_ms
        assert r.clips_per_s == pytest.approx(r.batch / (r.median_ms / 1e3))
        assert r.peak_mem_gb > 0


def test_cli_writes_well_formed_csv_and_json(tmp_path, capsys):
    out = tmp_path / "lat"
    argv = ["latency", "--models", "cnn3d_tiny,msf_mamba_tiny", "--device", "cpu", "--frames", "4", "--img-size", "32",
            "--views", "2", "--batch", "3", "--runs-per", "3", "--warmup", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "launch-bound" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "latency.csv")))
    assert tuple(rows[0]) == latency.CSV_FIELDS
    assert [(r["model"], r["measure"]) for r in rows] == [(m, k) for m in ("cnn3d_tiny", "msf_mamba_tiny")
                                                           for k in ("clip", "video", "throughput")]
    data = json.loads((out / "latency.json").read_text())
    assert {"torch", "cuda", "mamba_ssm", "gpu", "driver", "device"} <= set(data["environment"])
    assert data["environment"]["torch"] == torch.__version__
    assert "launch-bound" in data["note"] and data["settings"]["runs_per"] == 3
    for r, c in zip(data["results"], rows):
        assert r["median_ms"] == pytest.approx(float(c["median_ms"])) and r["runs"] == 3 and r["error"] == ""
    assert latency.preferred_latency(data["results"])[("cnn3d", "tiny")]["mode"] == "eager"


def test_results_record_the_forms_and_settings_they_ran_with(tmp_path, monkeypatch, capsys):
    """The JSON (and the printed footer) name the implementation a figure timed: the MSF_SCALE_* variables set, the
    compiled-inference forms, and the Triton CONFIGs as patched in this process, not as the defaults read."""
    import os

    pytest.importorskip("triton")
    from msf_scale.ops import _scan_chunked

    for name in [k for k in os.environ if k.startswith("MSF_SCALE_")]:   # the runner's own settings
        monkeypatch.delenv(name)
    monkeypatch.setenv("MSF_SCALE_SCAN_BACKEND", "torch")
    monkeypatch.setitem(_scan_chunked.CONFIG, "steps", 2)
    monkeypatch.setitem(_scan_chunked.CONFIG, "steps_tokens", 8)
    out = tmp_path / "lat"
    assert cli.main(["latency", "--models", "cnn3d_tiny", "--device", "cpu", "--frames", "4", "--img-size", "32",
                     "--views", "1", "--measures", "clip", "--runs-per", "2", "--warmup", "0", "--out", str(out)]) == 0
    choices = json.loads((out / "latency.json").read_text())["environment"]["choices"]
    assert choices["variables"] == {"MSF_SCALE_SCAN_BACKEND": "torch"}
    assert choices["scan_chunked"]["steps"] == 2
    assert {choices["conv1d_compiled"], choices["patch_embed_compiled"]} <= {"shifted", "cudnn", "gemm", "conv"}
    assert choices["mixer_layout"] in ("tokens", "channels") and choices["conv1d_tokens"] in ("triton", "torch")
    assert set(choices["conv1d_triton"]) == {"BL", "BE", "warps"}
    assert {"fusion_triton", "fusion_triton_batch1"} <= set(choices)
    assert choices["fusion_triton_batch1"]["stack_max_channels"] > 0   # the stacked bands' width rule
    printed = capsys.readouterr().out
    assert "blocks of 2 steps (8 token-major)" in printed and "MSF_SCALE_SCAN_BACKEND=torch" in printed
    assert "mixer layout " in printed


def test_cli_times_a_run_directory_at_its_own_shape(tmp_path):
    from safetensors.torch import save_file

    model = create_model("msf_mamba", size="tiny", **TINY)
    run = tmp_path / "runs" / "msf_mamba_tiny"
    run.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors"))
    from msf_scale.export import model_meta
    (run / "model_config.json").write_text(json.dumps(model_meta(model, "msf_mamba", "tiny")))
    out = tmp_path / "lat"
    assert cli.main(["latency", "--runs", str(tmp_path / "runs"), "--device", "cpu", "--measures", "clip",
                     "--runs-per", "2", "--warmup", "0", "--out", str(out)]) == 0
    (row,) = json.loads((out / "latency.json").read_text())["results"]
    assert (row["model"], row["source"], row["input"]) == ("msf_mamba_tiny", str(run), "3 x 4 x 32 x 32")


@pytest.mark.parametrize("argv", [["--modes", "graph", "--device", "cpu"], ["--modes", "fast", "--device", "cpu"],
                                  ["--models", "msf_mamba_huge", "--device", "cpu"], ["--runs", "/nonexistent"],
                                  ["--measures", "latency", "--device", "cpu"]])
def test_cli_bad_input_is_one_line_exit_2(argv, tmp_path, capsys):
    assert cli.main(["latency", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("msf-scale latency: error:") and "\n" not in err


def test_graph_mode_refuses_cpu():
    with pytest.raises(ValueError, match="CUDA"):
        build_runner(create_model("cnn3d", size="tiny", **{k: TINY[k] for k in ("num_classes", "num_frames", "img_size")}),
                     torch.zeros(1, 3, 4, 32, 32), "graph")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["graph", "compile"])
@pytest.mark.parametrize("variant", ["videomamba", "msf_mamba_plus"])
def test_fast_modes_give_the_eager_logits_on_gpu(mode, variant):
    torch.manual_seed(0)
    model = create_model(variant, size="tiny", fusion_init="uniform", **TINY).cuda().eval()
    x = torch.randn(2, 3, 4, 32, 32, device="cuda")
    eager = build_runner(model, x, "eager", torch.bfloat16)(x).float()
    run = build_runner(model, x, mode, torch.bfloat16)
    for _ in range(2):   # replays read the new input each time
        x2 = torch.randn_like(x)
        torch.testing.assert_close(run(x2).float(), build_runner(model, x2, "eager", torch.bfloat16)(x2).float(),
                                   rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(run(x).float(), eager, rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("variant, fusion_forms", [("videomamba", "defaults"), ("msf_mamba_plus", "defaults"),
                                                   ("msf_mamba_plus", "plain")])
def test_frozen_compile_gives_the_eager_logits_on_gpu(variant, fusion_forms, monkeypatch):
    """Frozen compile against eager. The eager reference runs the fused fusion op channel-major on the unpadded input
    (CONFIG out_tokens / fwd_pad_input False); the compiled model with batch 1's defaults (token-major output, padded
    input; session 21) or with both off ("plain"), set before compiling."""
    from msf_scale.ops import _fusion_triton

    torch.manual_seed(0)
    model = create_model(variant, size="tiny", fusion_init="uniform", **TINY).cuda().eval()
    x = torch.randn(1, 3, 4, 32, 32, device="cuda")
    with monkeypatch.context() as plain:
        plain.setitem(_fusion_triton.CONFIG, "out_tokens", False)
        plain.setitem(_fusion_triton.CONFIG, "fwd_pad_input", False)
        eager = build_runner(model, x, "eager", torch.bfloat16)(x).float()
    if fusion_forms == "plain":
        monkeypatch.setitem(_fusion_triton.CONFIG, "out_tokens", False)
        monkeypatch.setitem(_fusion_triton.CONFIG, "fwd_pad_input", False)
    run = build_runner(model, x, "compile", torch.bfloat16, freeze=True)
    torch.testing.assert_close(run(x).float(), eager, rtol=3e-2, atol=3e-2)


def test_freeze_is_on_while_inductor_compiles_and_off_after(monkeypatch):
    """Inductor reads ``freezing`` when it compiles, in the runner's warm-up calls: on there, restored after; off
    by default on CPU."""
    import torch._inductor.config as inductor_config
    seen = []

    def fake_compile(model, **kw):
        def compiled(x):
            seen.append(inductor_config.freezing)
            return model(x)
        return compiled
    monkeypatch.setattr(torch, "compile", fake_compile)
    model = create_model("cnn3d", size="tiny", **{k: TINY[k] for k in ("num_classes", "num_frames", "img_size")})
    x = torch.zeros(1, 3, 4, 32, 32)
    run = build_runner(model, x, "compile", warmup=2, freeze=True)
    assert seen == [True, True] and inductor_config.freezing is False
    run(x)
    assert seen[-1] is False
    build_runner(model, x, "compile", warmup=1)   # the default: on CUDA only
    assert seen[-1] is False
    with pytest.raises(ValueError, match="freeze"):
        build_runner(model, x, "eager", freeze=True)


@pytest.mark.gpu
def test_graph_runner_keeps_the_cached_tensors_it_captured_alive():
    """A graph runner with the inference caches reads their tensors. After a weight change, an eager forward
    rebuilds the caches and frees the old tensors but for the runner's references: replays give what they gave
    before that rebuild (the memory they read was not reused), bit for bit."""
    torch.manual_seed(0)
    model = create_model("msf_mamba_plus", size="tiny", fusion_init="uniform", **TINY).cuda().eval()
    x = torch.randn(1, 3, 4, 32, 32, device="cuda")
    run = build_runner(model, x, "graph", torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    before = run(x).float().clone()
    with torch.no_grad():
        model(x)                                   # rebuilds every cache
        torch.cuda.empty_cache()
        junk = [torch.randn(1 << 20, device="cuda") for _ in range(64)]   # take what was freed
    torch.testing.assert_close(run(x).float(), before, rtol=0, atol=0)
    del junk


def test_whole_path_from_a_video_file(tmp_path):
    """--video-file: decode + test views + forward, one row (eager) with the video's views as its batch."""
    from msf_scale.data.video import encode_mp4

    clip = np.random.default_rng(0).integers(0, 255, size=(12, 40, 48, 3), dtype=np.uint8)
    path = tmp_path / "clip.mp4"
    path.write_bytes(encode_mp4(clip))
    out = tmp_path / "lat"
    assert cli.main(["latency", "--models", "cnn3d_tiny", "--device", "cpu", "--frames", "4", "--img-size", "32",
                     "--views", "2", "--measures", "clip", "--runs-per", "2", "--warmup", "0", "--video-file",
                     str(path), "--out", str(out)]) == 0
    rows = json.loads((out / "latency.json").read_text())["results"]
    (row,) = [r for r in rows if r["measure"] == "file"]
    assert row["batch"] == 2 and row["mode"] == "eager" and str(path) in row["source"]
    assert 0 < row["min_ms"] <= row["median_ms"] <= row["p90_ms"]


def test_a_mode_that_fails_is_a_row_with_its_error(monkeypatch):
    import msf_scale.latency as L

    def broken(model, x, mode, dtype):
        if mode == "compile":
            raise RuntimeError("inductor: cannot compile this\nsecond line")
        return build_runner(model, x, mode, dtype)
    monkeypatch.setattr(L, "build_runner", broken)
    model = create_model("cnn3d", size="tiny", **{k: TINY[k] for k in ("num_classes", "num_frames", "img_size")})
    rows = L.measure_model(model, "cnn3d_tiny", "cnn3d", "tiny", "registry", torch.device("cpu"),
                           ["eager", "compile"], 1, 0, 2, 0, None)
    assert [(r.mode, r.median_ms is None) for r in rows] == [("eager", False), ("compile", True)]
    assert rows[1].error == "compile failed: RuntimeError: inductor: cannot compile this"


@pytest.mark.parametrize("variant", ["videomamba", "msf_mamba_plus"])
def test_runner_groups_the_scans_with_the_same_logits(variant):
    """build_runner's default switches every mixer to the grouped scan (both directions in one call) and turns the
    inference caches on: the logits of the plain model; grouped_scan=None leaves the model as configured, False
    ungroups; inference_cache=False turns the caches off and drops them."""
    torch.manual_seed(0)
    model = create_model(variant, size="tiny", fusion_init="uniform", **TINY).eval()
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        want = model(x)
    assert not any(blk.mixer.grouped_scan for blk in model.blocks)
    assert torch.equal(build_runner(model, x, "eager", grouped_scan=None)(x), want)
    assert not any(blk.mixer.grouped_scan for blk in model.blocks)
    got = build_runner(model, x, "eager")(x)
    assert all(blk.mixer.grouped_scan and blk.mixer.inference_cache for blk in model.blocks)
    assert all(blk.fusion.inference_cache for blk in model.blocks if blk.fusion is not None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "_inference_packed" in model.blocks[0].mixer.__dict__
    build_runner(model, x, "eager", grouped_scan=False, inference_cache=False)
    assert not any(blk.mixer.grouped_scan or blk.mixer.inference_cache for blk in model.blocks)
    assert "_inference_packed" not in model.blocks[0].mixer.__dict__
