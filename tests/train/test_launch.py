"""End to end through `accelerate launch --num_processes 2` on CPU with DeepSpeed ZeRO (gloo): training,
checkpoints, export after ZeRO-3, SIGKILL + `--resume auto`, a dead rank, and a val split (DDP). Each launch takes
~20 s (plus ~1 min once on a fresh machine while DeepSpeed JIT-builds its shared-memory op)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from msf_scale.checkpoint import latest_checkpoint
from msf_scale.export import load_model
from msf_scale.metrics import read_jsonl

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CPU_ZERO = REPO / "cluster" / "accelerate_cpu_zero.yaml"
# 2 ranks x 4 clips: 4 steps per epoch on the 32 training clips; lr high enough that the weights move
RUN = ["--data.num_workers", "0", "--data.num_clips", "1", "--data.num_crops", "1", "--train.batch_size", "4",
       "--train.precision", "fp32", "--log.log_every", "1", "--log.progress", "false", "--train.eval_every", "0",
       "--epochs", "4", "--schedule.warmup_epochs", "1", "--optim.lr", "0.1", "--train.ckpt_every", "2",
       "--train.keep_last", "3"]


def _start(argv: list[str], log: Path, deepspeed: bool = True) -> subprocess.Popen:
    """`accelerate launch` of train.py on 2 CPU ranks (DeepSpeed's config, or plain DDP), one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("ACCELERATE_USE_CPU", None)  # it would silently turn DeepSpeed off
    launcher = ["--config_file", str(CPU_ZERO)] if deepspeed else ["--multi_gpu", "--mixed_precision", "no"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2",
           "--main_process_port", "0", str(REPO / "msf_scale" / "train.py"), *argv]
    with open(log, "w") as f:  # own process group: the test can SIGKILL launcher and ranks together
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _run(argv: list[str], log: Path, timeout: float = 400, deepspeed: bool = True) -> None:
    p = _start(argv, log, deepspeed)
    try:
        rc = p.wait(timeout=timeout)
    finally:
        _kill_group(p)
    assert rc == 0, f"launch failed (rc {rc}):\n{log.read_text()[-4000:]}"


def _children() -> dict[int, list[int]]:
    """ppid -> pids, from /proc."""
    out: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(d.name))
    return out


def _kill_group(p: subprocess.Popen) -> None:
    """SIGKILL the launcher and every descendant: torchrun starts each rank in a session of its own, so
    killing the launcher's process group alone would leave the ranks running."""
    kids, tree, todo = _children(), [], [p.pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += kids.get(pid, [])
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()


def _wait_for(path: Path, p: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert p.poll() is None, f"the run ended (rc {p.returncode}) before {path} appeared"
        assert time.time() < end, f"{path} did not appear in {timeout} s"
        time.sleep(0.05)


def _losses(run: Path) -> dict[int, float]:
    """step -> logged loss; a step logged twice (a resume that did not truncate the log) fails here."""
    rows = [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    steps = [s for s, _ in rows]
    assert len(steps) == len(set(steps)), f"steps logged more than once in {run}"
    return dict(rows)


def _workers(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the launcher's worker processes (from /proc)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher_pid and "RANK" in env:
            out[int(env["RANK"])] = int(d.name)
    return out


@pytest.fixture
def argv(tiny_common):
    return lambda out, *extra: [*tiny_common, *RUN, "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """An uninterrupted ZeRO-2 run of 8 steps (the schedule spans 16), made by the first test that needs it."""
    return {"dir": tmp_path_factory.mktemp("ref") / "run"}


def _reference(reference: dict, argv) -> Path:
    out = reference["dir"]
    if not (out / "final_metrics.json").exists():
        _run(argv(out, "--dist.zero_stage", "2", "--max-steps", "8"), out.parent / "log.txt")
    return out


def _ddp_reference(reference: dict, argv) -> Path:
    """The same 8 steps through plain DDP (no DeepSpeed): an independent engine for ZeRO-2 to agree with."""
    out = reference["dir"].parent / "ddp"
    if not (out / "final_metrics.json").exists():
        _run(argv(out, "--max-steps", "8"), out.parent / "ddp_log.txt", deepspeed=False)
    return out


@pytest.mark.parametrize("stage", [2, 3, 1])
def test_zero_trains_checkpoints_and_exports(stage, reference, argv, tmp_path):
    ref = _reference(reference, argv)
    run = ref
    if stage != 2:
        run = tmp_path / "run"
        _run(argv(run, "--dist.zero_stage", str(stage), "--max-steps", "8"), tmp_path / "log.txt")
    meta = json.loads((run / "run_meta.json").read_text())
    assert (meta["engine"], meta["zero_stage"], meta["world_size"], meta["global_batch"]) == (
        "DeepSpeedEngine", stage, 2, 8)
    ckpt = latest_checkpoint(run)
    assert ckpt.name == "step_0000008" and (ckpt / "pytorch_model").is_dir()   # DeepSpeed's own layout
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 9))
    assert all(math.isfinite(v) for v in losses.values())
    # Sharding changes where the numbers live, not the maths: stages 1 and 3 follow ZeRO-2's trajectory, and
    # ZeRO-2 (the reference itself) follows plain DDP's, so that no stage is compared with its own run.
    other = _losses(_ddp_reference(reference, argv) if stage == 2 else ref)
    assert len(set(other.values())) > 1                                        # the weights did move
    assert losses == pytest.approx(other, rel=1e-4), (losses, other)
    # The export equals the fp32 weights DeepSpeed consolidates from its (sharded) checkpoint.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from msf_scale.models import create_model
    ref_state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="pytorch_model")
    exported = load_model(run)
    assert set(ref_state) == set(exported.state_dict())
    for k, v in exported.state_dict().items():
        assert torch.equal(v, ref_state[k].float()), k
    cfg = json.loads((run / "model_config.json").read_text())["config"]
    fresh = create_model("msf_mamba", size="tiny", **{**{k: v for k, v in cfg.items() if k != "variant"},
                                                      "fusion_scales": tuple(cfg["fusion_scales"])})
    fresh.load_state_dict(ref_state)
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(exported(x), fresh.eval()(x))
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["test_samples"] == 16   # every test clip counted once across the two ranks


def test_zero2_compiled_trains_like_eager(argv, tmp_path):
    # --train.compile regional / whole with DeepSpeed (accelerate 1.16's DeepSpeed launcher drops its own --dynamo_* flags):
    # Accelerate compiles the engine's module block by block in place; checkpoints, the EMA, export and evaluation run
    # on it (aot_eager: dynamo and AOTAutograd without inductor's code generation). No drop path: compiled, it draws
    # with another op than eager. The torch scan: under compile it is the custom op pair (ops/scan.py); a planted
    # 1.5x on its gradient fails this. No warm-up and lr 0.1 after the linear scaling (3.2 per 256 clips at a global
    # batch of 8): 4 steps of the smaller default moved the losses by ~5e-5 with that gradient 1.5x off.
    extra = ["--dist.zero_stage", "2", "--max-steps", "4", "--model.drop_path_rate", "0", "--train.ema", "true",
             "--model.arch.scan_backend", "torch", "--schedule.warmup_epochs", "0", "--optim.lr", "3.2"]
    runs = {name: tmp_path / name for name in ("eager", "regional", "whole")}
    _run(argv(runs["eager"], *extra), tmp_path / "eager.txt")
    for name in ("regional", "whole"):   # whole: DeepSpeed's engine.compile()
        _run(argv(runs[name], *extra, "--train.compile", name, "--train.compile_backend", "aot_eager"),
             tmp_path / f"{name}.txt")
    meta = {k: json.loads((run / "run_meta.json").read_text()) for k, run in runs.items()}
    assert {k: m["engine"] for k, m in meta.items()} == dict.fromkeys(runs, "DeepSpeedEngine")
    assert (meta["eager"]["compiled"], meta["whole"]["compiled"]) == ("no", "whole")
    assert meta["regional"]["compiled"].startswith("regional ("), meta["regional"]["compiled"]
    eager = _losses(runs["eager"])
    assert sorted(eager) == [1, 2, 3, 4] and len(set(eager.values())) > 1
    x = torch.randn(2, 3, 4, 32, 32)
    for name in ("regional", "whole"):
        assert _losses(runs[name]) == pytest.approx(eager, rel=1e-5), (name, _losses(runs[name]), eager)
        # The export holds the model's own names (and its EMA), as the eager run's does. Logits to 1e-3: the last
        # step's update, which no logged loss shows, moved them 1.3e-4 apart (Adam scales tiny gradient differences up).
        with torch.no_grad():
            for ema in (False, True):
                torch.testing.assert_close(load_model(runs[name], ema=ema)(x), load_model(runs["eager"], ema=ema)(x),
                                           rtol=1e-2, atol=1e-3)


def test_zero2_gradient_accumulation_follows_the_full_batch(argv, tmp_path):
    """DeepSpeed accumulates inside its engine (Accelerate hands it the micro-batches): 2 clips x 2 micro-batches
    per rank must take the same steps as 4 clips x 1 (global batch 8 both; no drop path, whose masks are drawn
    per micro-batch)."""
    runs = {}
    for name, batch, accum in (("full", "4", "1"), ("accum", "2", "2")):
        runs[name] = tmp_path / name
        _run(argv(runs[name], "--dist.zero_stage", "2", "--max-steps", "6", "--model.drop_path_rate", "0",
                  "--train.batch_size", batch, "--train.grad_accum", accum), tmp_path / f"{name}.txt")
    meta = json.loads((runs["accum"] / "run_meta.json").read_text())
    assert (meta["engine"], meta["grad_accum"], meta["global_batch"], meta["steps_per_epoch"]) == (
        "DeepSpeedEngine", 2, 8, 4)
    full, accum = _losses(runs["full"]), _losses(runs["accum"])
    assert sorted(accum) == list(range(1, 7))
    assert accum == pytest.approx(full, rel=1e-4), (accum, full)
    assert len(set(full.values())) > 1                                         # the weights did move
    a, b = load_model(runs["full"]).state_dict(), load_model(runs["accum"]).state_dict()
    for k in a:
        assert torch.allclose(b[k], a[k], rtol=1e-3, atol=1e-5), k


def test_ddp_two_processes_with_ema(argv, tmp_path):
    """Without DeepSpeed: DistributedDataParallel over gloo (Accelerate's MULTI_CPU), EMA on."""
    run = tmp_path / "run"
    _run(argv(run, "--max-steps", "4", "--train.ema", "true", "--train.ema_decay", "0.5"), tmp_path / "log.txt",
         deepspeed=False)
    meta = json.loads((run / "run_meta.json").read_text())
    assert (meta["engine"], meta["zero_stage"], meta["world_size"]) == ("DistributedDataParallel", 0, 2)
    final = json.loads((run / "final_metrics.json").read_text())
    assert final["bad_steps"] == 0 and final["step"] == 4
    assert final["test_samples"] == 16 and "ema_test_top1" in final
    assert (run / "model_ema.safetensors").is_file()


def test_ddp_two_processes_with_a_val_split(argv, tmp_path):
    """DDP on 2 ranks with --data.val_fraction: the split is decided on the main process and broadcast, every
    evaluation is on val (the carved clips counted once across the ranks), best/ is selected on val top-1, and test
    is evaluated once, at the end."""
    from msf_scale.data.splits import plan_carve

    run = tmp_path / "run"
    _run(argv(run, "--epochs", "3", "--train.eval_every", "1", "--data.val_fraction", "0.25"), tmp_path / "log.txt",
         deepspeed=False)
    meta = json.loads((run / "run_meta.json").read_text())
    assert (meta["engine"], meta["world_size"], meta["best_selected_on"]) == ("DistributedDataParallel", 2, "val_top1")
    carve = plan_carve(meta["data"], 0.25, 0)[0]
    assert meta["val"]["source"] == "carved" and tuple(meta["val"]["subjects"]) == carve.val_subjects
    rows = read_jsonl(run / "metrics.jsonl")
    vals, tests = [r for r in rows if "val_top1" in r], [r for r in rows if "test_top1" in r]
    assert [r["epoch"] for r in vals] == [1, 2, 3]                               # val_top1 at every evaluation
    assert all(r["val_samples"] == len(carve.val_keys) for r in vals)           # once across the 2 ranks
    assert len(tests) == 1 and tests[0]["epoch"] == 3 and tests[0]["test_samples"] == 16   # test: once, at the end
    final = json.loads((run / "final_metrics.json").read_text())
    best = json.loads((run / "best" / "model_config.json").read_text())
    top = max(vals, key=lambda r: r["val_top1"])                                 # the first of equal ones: best/ kept it
    assert final["best_selected_on"] == "val_top1" and best["selected_on"] == "val_top1"
    assert (best["step"], best["val_top1"]) == (top["step"], top["val_top1"]) == (final["best_step"],
                                                                               final["best_val_top1"])
    assert best["test_top1"] == final["best_test_top1"] and "test_top1" in final


def test_sigkill_then_resume_auto_matches_uninterrupted(reference, argv, tmp_path):
    ref_dir = _reference(reference, argv)
    run = tmp_path / "run"
    # Same schedule as the reference, but it would run 16 steps: it is killed long before the end.
    p = _start(argv(run, "--dist.zero_stage", "2", "--max-steps", "16"), tmp_path / "killed.txt")
    try:
        _wait_for(run / "ckpt" / "step_0000002" / "COMPLETE", p)
    finally:
        _kill_group(p)   # SIGKILL: launcher and both ranks, no chance to clean up
    newest = latest_checkpoint(run)
    assert newest is not None and int(newest.name[5:]) < 8
    # What a crash during a save leaves behind: never picked by --resume auto.
    shutil.copytree(newest, run / "ckpt" / "step_0000009.tmp")
    (run / "ckpt" / "step_0000009.tmp" / "COMPLETE").unlink()
    shutil.copytree(newest, run / "ckpt" / "step_0000010")
    (run / "ckpt" / "step_0000010" / "COMPLETE").unlink()
    _run(argv(run, "--dist.zero_stage", "2", "--max-steps", "8", "--resume", "auto"), tmp_path / "resumed.txt")
    meta = json.loads((run / "run_meta.json").read_text())
    assert meta["resumed_from"] == str(newest)
    start = int(newest.name[5:])
    ref, got = _losses(ref_dir), _losses(run)
    assert sorted(got) == list(range(1, 9))
    for step in range(start + 1, 9):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), (step, got, ref)


def test_a_dead_rank_fails_the_launch(argv, tmp_path):
    run = tmp_path / "run"
    p = _start(argv(run, "--dist.zero_stage", "2", "--epochs", "50"), tmp_path / "log.txt")
    try:
        _wait_for(run / "ckpt" / "step_0000002" / "COMPLETE", p)
        workers = _workers(p.pid)
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGKILL)
        rc = p.wait(timeout=120)   # no hang: the launcher notices and stops rank 0
    finally:
        _kill_group(p)
    assert rc != 0
