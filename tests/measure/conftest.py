"""Fixture run directories shaped like train.py's (config.yaml, run_meta.json, metrics.jsonl, eval.json,
final_metrics.json), and a latency.json shaped like msf-scale latency's, with known numbers to check plots against."""
import json
from pathlib import Path

import pytest
import yaml

# (variant, size) -> (test top-1, or None for a run without an evaluation)
RUNS = {("videomamba", "tiny"): 0.50, ("videomamba", "small"): 0.60, ("msf_mamba", "tiny"): 0.55,
        ("msf_mamba", "small"): 0.70, ("msf_mamba_plus", "tiny"): 0.65, ("msf_mamba_plus", "small"): None,
        ("cnn3d", "tiny"): 0.40}
# (variant, size) -> {mode: median ms}; msf_mamba_plus tiny is not timed at all
LATENCY = {("videomamba", "tiny"): {"eager": 30.0, "graph": 4.0}, ("videomamba", "small"): {"eager": 17.0, "graph": 6.5},
           ("msf_mamba", "tiny"): {"eager": 25.0, "graph": 5.0}, ("msf_mamba", "small"): {"eager": 24.0},
           ("msf_mamba_plus", "small"): {"graph": 15.0}, ("cnn3d", "tiny"): {"graph": 1.0}}
CLIPS_S = {"tiny": 400.0, "small": 200.0, "base": 100.0}   # training clips/s of a finished run, by size
MFU = {"tiny": 0.02, "small": 0.05, "base": 0.08}


def write_run(root: Path, variant: str, size: str, top1, steps: int = 40, name: str | None = None) -> Path:
    d = root / (name or f"{variant}_{size}")
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"model": {"variant": variant, "size": size, "num_frames": 8,
                                                             "img_size": 32, "arch": {}}}))
    from msf_scale.models import create_model
    macs = create_model(variant, size=size, num_classes=8, num_frames=8, img_size=32, device="meta").flops_per_clip()
    (d / "run_meta.json").write_text(json.dumps({"world_size": 1, "num_classes": 8, "forward_macs_per_clip": macs}))
    rows = [{"step": s, "loss": 2.0 - s / steps, "clips_per_s": 100.0 + s, "mfu": 0.01 * s / steps}
            for s in range(10, steps + 1, 10)]
    if top1 is not None:
        rows.insert(2, {"step": 20, "test_top1": top1 / 2, "epoch": 1})
        rows.append({"step": steps, "test_top1": top1, "epoch": 2})
        (d / "eval.json").write_text(json.dumps({"step": steps, "test_top1": top1}))
        (d / "final_metrics.json").write_text(json.dumps({"step": steps, "test_top1": top1, "clips_per_s": CLIPS_S[size],
                                                          "mfu": MFU[size], "wall_s": 12.0}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.fixture
def run_root(tmp_path) -> Path:
    root = tmp_path / "runs"
    for (v, s), top1 in RUNS.items():
        write_run(root, v, s, top1)
    return root


@pytest.fixture
def latency_file(tmp_path) -> Path:
    rows = [{"model": f"{v}_{s}", "variant": v, "size": s, "mode": mode, "measure": measure, "batch": 1,
             "input": "3 x 8 x 32 x 32", "median_ms": ms * (1 if measure == "clip" else 3), "p90_ms": ms * 1.1}
            for (v, s), modes in LATENCY.items() for mode, ms in modes.items() for measure in ("clip", "video")]
    p = tmp_path / "lat" / "latency.json"
    p.parent.mkdir()
    p.write_text(json.dumps({"environment": {"gpu": "TestGPU"}, "results": rows}))
    return p
