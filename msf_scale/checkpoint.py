"""Checkpoints that a crash cannot corrupt, resume, and the consolidated safetensors export.

Layout of a run directory:
    ckpt/step_0000500/   Accelerate/DeepSpeed state (model, optimizer, scheduler, RNG, TrainState, EMA),
                         meta.json (model config, data position) and COMPLETE, written last
    ckpt/step_0000600.tmp/   a save in progress: never picked by `--resume auto`
    model.safetensors + model_config.json   consolidated weights for inference (`load_model`); the JSON also
                         records the data and preprocessing (`data_record`), so eval and predict need no config
    best/model.safetensors + model_config.json   the same, at the evaluation with the best test top-1 so far
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
from typing import Any

import torch
from torch import nn

from msf_scale.config import ConfigError, UserPathError

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


def model_meta(model: nn.Module, variant: str, size: str) -> dict[str, Any]:
    cfg = dataclasses.asdict(model.cfg)
    cfg["grad_checkpointing"] = False  # an inference default, not a property of the weights
    return {"variant": variant, "size": size, "config": cfg}


def data_record(cfg, info, root: str) -> dict[str, Any]:
    """What an export must carry so that eval and predict see data as training did: the dataset (its root, or the
    synthetic generator's parameters), its classes, and the preprocessing of `msf_scale.data` at this geometry."""
    from msf_scale.data.schema import MEAN, STD

    return {"dataset": info.name, "num_classes": info.num_classes, "class_names": list(info.class_names),
            "data": {"root": str(Path(root).resolve()), "synthetic": cfg.data.root is None,
                     "synth": dict(cfg.data.synth)},
            "preprocessing": {"num_frames": cfg.model.num_frames, "img_size": cfg.model.img_size,
                              "mean": list(MEAN), "std": list(STD), "input": "RGB scaled to [0, 1], then (x - mean) / std",
                              "train_sampling": "one random frame in each of num_frames equal segments; random "
                                                f"resized crop (area >= {cfg.data.min_scale}), resize to img_size",
                              "test_sampling": "num_clips segment-centred clips x num_crops square crops of the "
                                               "short side along the long side, resized to img_size; softmax averaged",
                              "num_clips": cfg.data.num_clips, "num_crops": cfg.data.num_crops}}


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


def check_resume_compatible(ckpt: Path, meta: dict[str, Any]) -> None:
    """Refuse a checkpoint whose model differs from this run's (class count, widths, frames...)."""
    saved = json.loads((ckpt / "meta.json").read_text())["model"]
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


def export_model(accelerator, model: nn.Module, run_dir: Path, meta: dict[str, Any],
                 ema_module: nn.Module | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Consolidated `model.safetensors` + `model_config.json` (collective: ZeRO-3 gathers the shards)."""
    from safetensors.torch import save_file

    state = accelerator.get_state_dict(model)
    out = Path(run_dir) / "model.safetensors"
    if accelerator.is_main_process:
        out.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
        save_file(tensors, str(out), metadata={"format": "pt"})
        dtype = str(next(iter(tensors.values())).dtype).replace("torch.", "")
        (Path(run_dir) / "model_config.json").write_text(json.dumps({**meta, "dtype": dtype, **(extra or {})}, indent=1))
        if ema_module is not None:
            ema = {k: v.detach().cpu().contiguous().clone() for k, v in ema_module.state_dict().items()}
            save_file(ema, str(Path(run_dir) / "model_ema.safetensors"), metadata={"format": "pt"})
    accelerator.wait_for_everyone()
    return out


def best_top1(run_dir: Path) -> float:
    """The test top-1 that `best/` holds (-1 when there is none): what a resumed run must beat. Read from disk, so
    it is right whichever checkpoint the run resumes from and wherever the last evaluation fell."""
    conf = Path(run_dir) / "best" / "model_config.json"
    return float(json.loads(conf.read_text())["test_top1"]) if conf.is_file() else -1.0


def recover_best(run_dir: Path) -> None:
    """After a crash between export_best's two renames `best/` is missing and `best.old/` still complete (main
    process only, before a resumed run reads `best_top1`)."""
    best, old = run_dir / "best", run_dir / "best.old"
    if not best.exists() and old.is_dir():
        os.replace(old, best)


def export_best(accelerator, model: nn.Module, run_dir: Path, meta: dict[str, Any],
                ema_module: nn.Module | None = None, extra: dict[str, Any] | None = None) -> Path:
    """`export_model` into `best/` (collective). Written to `best.tmp`, then `best` -> `best.old`, `best.tmp` ->
    `best` and `best.old` removed: at every moment a complete best exists (`recover_best` finds it)."""
    run_dir = Path(run_dir)
    best, tmp, old = run_dir / "best", run_dir / "best.tmp", run_dir / "best.old"
    if accelerator.is_main_process:
        recover_best(run_dir)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    export_model(accelerator, model, tmp, meta, ema_module, extra)
    if accelerator.is_main_process:
        shutil.rmtree(old, ignore_errors=True)
        if best.exists():
            os.replace(best, old)
        os.replace(tmp, best)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return best


def load_model(path: str | Path, ema: bool = False, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild an exported model for inference from a run dir or a `model*.safetensors` file."""
    from safetensors.torch import load_file

    from msf_scale.models import create_model

    p = Path(path)
    weights = p if p.suffix == ".safetensors" else p / ("model_ema.safetensors" if ema else "model.safetensors")
    conf = weights.parent / "model_config.json"
    if not weights.is_file() or not conf.is_file():
        raise UserPathError(f"{weights} or {conf} is missing: export happens at the end of training "
                                "(msf_scale/train.py); pass a run directory that finished")
    meta = json.loads(conf.read_text())
    cfg = {k: v for k, v in meta["config"].items() if k != "variant"}
    if "fusion_scales" in cfg:   # JSON lists back to tuples (the 3-D CNN has none)
        cfg["fusion_scales"] = tuple(cfg["fusion_scales"])
    model = create_model(meta["variant"], size=meta["size"], **cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in load_file(str(weights)).items()}, strict=True)
    return model.to(device=device, dtype=dtype).eval()


def read_model_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    return json.loads((p.parent if p.suffix == ".safetensors" else p).joinpath("model_config.json").read_text())
