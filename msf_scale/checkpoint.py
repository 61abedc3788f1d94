"""Resumable training state that a crash cannot corrupt: save, find, resume, check compatibility.

Layout of a run directory (what is for inference, `model.safetensors` and `best/`, is export.py's):
    ckpt/step_0000500/   Accelerate/DeepSpeed state (model, optimizer, scheduler, RNG, TrainState, EMA),
                         meta.json (model config, val split identity, data position) and COMPLETE, written last
    ckpt/step_0000600.tmp/   a save in progress: never picked by `--resume auto`
A save writes into `step_N.tmp`, then the main process writes `COMPLETE` and renames the directory
(an atomic rename on one filesystem; multi-node runs need the run dir on a shared filesystem).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from msf_scale.config import ConfigError

_STEP_DIR = re.compile(r"^step_(\d{7})$")
# Fields of the model config that may differ on resume: how it executes, not what it computes.
_EXECUTION_FIELDS = {"scan_backend", "fusion_backend", "grad_checkpointing"}


@dataclasses.dataclass
class TrainState:
    """Loop position, registered with `accelerator.register_for_checkpointing` so resume is exact."""
    step: int = 0                # optimizer updates done (skipped bad steps do not count)
    epoch: int = 0
    batch_in_epoch: int = 0      # loader batches (micro-batches) of `epoch` already consumed, per rank
    clips_seen: int = 0          # training clips consumed, all ranks
    bad_steps: int = 0           # non-finite losses so far (in total)
    clips_per_batch: int = 0     # batch_size x world size when saved, to map the position if it changes

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for k, v in state.items():
            setattr(self, k, int(v))


def _complete(path: Path) -> bool:
    return path.is_dir() and _STEP_DIR.match(path.name) is not None and (path / "COMPLETE").is_file()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; `.tmp` and marker-less directories are ignored."""
    root = Path(run_dir) / "ckpt"
    found = [p for p in root.iterdir() if _complete(p)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """None -> fresh start (refused if the run dir already holds checkpoints); 'auto' -> newest complete
    checkpoint of the run dir or a fresh start; a path -> that checkpoint (or the newest in that run dir)."""
    if resume is None:
        latest = latest_checkpoint(run_dir)
        if latest is not None:
            raise ConfigError(f"{run_dir} already holds checkpoints (newest {latest.name}); pass --resume auto "
                             "to continue it, or choose another --output-dir")
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    p = Path(resume)
    if (p / "ckpt").is_dir() and not _STEP_DIR.match(p.name):
        latest = latest_checkpoint(p)
        if latest is None:
            raise ConfigError(f"--resume {resume}: no complete checkpoint under {p / 'ckpt'}")
        return latest
    if not _complete(p):
        raise ConfigError(f"--resume {resume}: not a complete checkpoint directory (ckpt/step_NNNNNNN with a "
                         "COMPLETE marker); use --resume auto to pick the newest complete one")
    return p


def check_resume_compatible(ckpt: Path, meta: dict[str, Any], val_split: dict[str, Any] | None = None,
                            describe: Callable[[dict[str, Any]], str] = repr) -> None:
    """Refuse a checkpoint whose model differs from this run's (class count, widths, frames...), or, given this run's
    val split identity (data.builders.split_identity), whose val split differs: its val clips would then have been
    trained on, or its training clips held out. A checkpoint that records no val split had none. `describe` words
    an identity for the message (the caller passes data.builders.describe_identity: this support module imports no
    data code, docs/ARCHITECTURE.md)."""
    full = json.loads((ckpt / "meta.json").read_text())
    saved = full["model"]
    a, b = saved["config"], meta["config"]
    diffs = [f"{k}: checkpoint {a.get(k)!r} vs this run {b.get(k)!r}" for k in sorted(set(a) | set(b))
             if k not in _EXECUTION_FIELDS and _norm(a.get(k)) != _norm(b.get(k))]
    if saved["variant"] != meta["variant"]:
        diffs.insert(0, f"variant: checkpoint {saved['variant']!r} vs this run {meta['variant']!r}")
    if diffs:
        hint = (" (num_classes comes from the dataset: resume with the dataset the checkpoint was trained on)"
                if any(d.startswith("num_classes") for d in diffs) else "")
        raise ConfigError(f"cannot resume from {ckpt}: the model differs{hint}:\n  " + "\n  ".join(diffs)
                         + "\nStart a new run with another --output-dir, or restore the original settings.")
    if val_split is not None:
        had = full.get("val_split", {"source": "none"})
        if had != val_split:
            raise ConfigError(f"cannot resume from {ckpt}: the val split differs: checkpoint "
                              f"{describe(had)} vs this run {describe(val_split)}; restore the "
                              "original data / data.val_fraction / data.val_seed, or start a new run with another "
                              "--output-dir")


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def save_checkpoint(accelerator, run_dir: Path, step: int, meta: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank writes its part of `step_N.tmp`; the main process seals and renames it."""
    root = Path(run_dir) / "ckpt"
    final, tmp = root / f"step_{step:07d}", root / f"step_{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a crashed save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1))
        with open(tmp / "COMPLETE", "w") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step saved again (e.g. a resumed run that had already finished)
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
