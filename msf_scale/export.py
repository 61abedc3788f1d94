"""Artifacts for inference: the consolidated safetensors export, `best/`, and loading them back as a model.

    model.safetensors + model_config.json   consolidated weights (`load_model`); the JSON records the model
                         (`model_meta`), the data and preprocessing (`data_record`), so eval and predict need no config
    model_ema.safetensors   the EMA weights, where training kept them
    best/   the same, at the evaluation with the best val top-1 so far (test top-1 in a run without a val split;
            model_config.json's `selected_on` says which), kept complete by two renames
Exports are collective under Accelerate (ZeRO-3 gathers the shards); only the main process writes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from msf_scale.config import UserPathError
from msf_scale.distributed import uses_deepspeed


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


def export_model(accelerator, model: nn.Module, run_dir: Path, meta: dict[str, Any],
                 ema_module: nn.Module | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Consolidated `model.safetensors` + `model_config.json` (collective: ZeRO-3 gathers the shards)."""
    from safetensors.torch import save_file

    # torch.compile's wrappers rename parameters (`_orig_mod.*` whole, `blocks.0._orig_mod.*` regional): unwrap them,
    # except from DeepSpeed's engine, which ZeRO-3 gathers through (its compiles keep the module's own names)
    if not uses_deepspeed(accelerator):
        model = accelerator.unwrap_model(model, keep_torch_compile=False)
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


def best_top1(run_dir: Path, metric: str = "test_top1") -> float:
    """The `metric` (val_top1 or test_top1) that `best/` was selected on (-1 when there is none, or when best/ was
    selected on another metric: a run that now has a val split replaces a best/ chosen on test): what a resumed run
    must beat. Read from disk, so it is right whichever checkpoint the run resumes from."""
    conf = Path(run_dir) / "best" / "model_config.json"
    if not conf.is_file():
        return -1.0
    rec = json.loads(conf.read_text())
    if rec.get("selected_on", "test_top1") != metric or metric not in rec:
        return -1.0
    return float(rec[metric])


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
