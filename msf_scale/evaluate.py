"""Top-1 / top-5 on a split, multi-view, gathered across ranks; and `msf-scale eval --ckpt RUN`.

    msf-scale eval --ckpt runs/msf_mamba_tiny [--data DIR] [--split test] [--num-clips 2 --num-crops 3]
    msf-scale eval --ckpt runs/msf_mamba_tiny/best             # the best evaluation's export
    accelerate launch -m msf_scale.evaluate --ckpt RUN          # the same, split over several processes

The data and the test views default to what the export recorded (model_config.json: the dataset root, or the
synthetic generator's parameters, and num_clips x num_crops); an export that recorded no data needs --data, and a
dataset whose classes differ from the model's is refused.

Softmax probabilities are averaged over the V = clips x crops views of a video. Every rank steps in
lockstep (a rank whose shard ran out runs a dummy batch) because under ZeRO-3 each forward is a
collective; results are gathered by sample key and de-duplicated exactly.
"""
from __future__ import annotations

import argparse
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from msf_scale.config import ConfigError, UserError, UserPathError
from msf_scale.data.builders import data_root, split_loader
from msf_scale.distributed import any_rank, build_eval_accelerator, run_rank, shutdown
from msf_scale.metrics import topk_correct


def check_classes(meta: dict[str, Any], info, root: str) -> None:
    """The model must have been trained on this dataset's classes: same count and, where recorded, same names."""
    n = meta["config"]["num_classes"]
    if n != info.num_classes:
        raise ConfigError(f"the model has {n} classes but {root} has {info.num_classes} ({info.name}): evaluate on "
                          "the dataset it was trained on (--data DIR)")
    names = meta.get("class_names")
    if names and list(names) != list(info.class_names):
        raise ConfigError(f"the model's classes differ from those of {root} ({info.name}), e.g. "
                          f"{next((a, b) for a, b in zip(names, info.class_names) if a != b)}: pass the dataset it "
                          "was trained on with --data")


def check_synthetic_unchanged(recorded_name: str | None, synth: dict[str, Any]) -> None:
    """An export records synthetic data by its generator parameters; if the generator or a preset changed since,
    those parameters now make other clips (another digest), and evaluating on them would be silently wrong."""
    if not recorded_name or not recorded_name.startswith("synthetic-"):
        return
    from msf_scale.data.synthetic import synth_config

    now = f"synthetic-{synth_config(**{k: v for k, v in synth.items() if k != 'cache_dir'}).digest()}"
    if now != recorded_name:
        raise UserPathError(f"the export was trained on {recorded_name}, but its recorded synthetic parameters now "
                            f"generate {now} (the generator or a preset changed since): pass that data with --data DIR")


def recorded_root(meta: dict[str, Any], run_dir: Path) -> str:
    """The dataset an export was trained on: its recorded root, or the synthetic data regenerated from its
    recorded parameters (the same cache path); for older exports the run's config.yaml. Else --data is needed."""
    rec = meta.get("data")
    if rec is None and (Path(run_dir) / "config.yaml").is_file():
        from msf_scale.config import read_config
        run_cfg = read_config(Path(run_dir) / "config.yaml")
        meta.setdefault("preprocessing", {"num_clips": run_cfg.data.num_clips, "num_crops": run_cfg.data.num_crops})
        return data_root(run_cfg.data.root, run_cfg.data.synth)
    if rec is None:
        raise UserPathError(f"{run_dir} records no dataset (an export older than the data record): pass --data DIR")
    if rec.get("synthetic"):
        synth = rec.get("synth") or {}
        check_synthetic_unchanged(meta.get("dataset"), synth)
        return data_root(None, synth)
    if not Path(rec["root"]).is_dir():
        raise UserPathError(f"the dataset recorded in the export, {rec['root']}, is not there: pass --data DIR")
    return data_root(rec["root"], {})


@torch.no_grad()
def evaluate_model(model: nn.Module, loader, accelerator, view_shape: tuple[int, ...],
                   autocast_bf16: bool = False) -> dict[str, Any]:
    """view_shape = (V, 3, T, S, S) of one video, for the dummy batches of ranks that finished early."""
    was_training = model.training
    model.eval()
    dev = accelerator.device
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if autocast_bf16 else nullcontext()
    local: dict[str, tuple[int, bool, bool]] = {}
    it = iter(loader)
    while True:
        batch = next(it, None)
        if not any_rank(accelerator, batch is not None):
            break
        video = batch[0] if batch is not None else torch.zeros(1, *view_shape)
        b, v = video.shape[:2]
        with amp:
            logits = model(video.flatten(0, 1).to(dev, non_blocking=True))   # [B*V, classes]
        probs = logits.float().softmax(-1).view(b, v, -1).mean(1)                      # [B, classes]
        if batch is not None:
            label, keys = batch[1].to(dev), batch[2]
            c1, c5 = topk_correct(probs, label, (1, 5))
            for key, y, hit1, hit5 in zip(keys, label.tolist(), c1.tolist(), c5.tolist()):
                local[key] = (y, hit1, hit5)
    merged: dict[str, tuple[int, bool, bool]] = {}
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object
        parts = gather_object([local])
    else:
        parts = [local]
    for part in parts:
        for key, res in part.items():
            merged.setdefault(key, res)
    model.train(was_training)
    n = len(merged)
    return {"top1": sum(r[1] for r in merged.values()) / max(n, 1),
            "top5": sum(r[2] for r in merged.values()) / max(n, 1),
            "num_samples": n, "views": int(view_shape[0])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="msf-scale eval", description="Top-1/top-5 of an exported run.")
    p.add_argument("--ckpt", required=True, help="run directory (with model.safetensors) or a .safetensors file")
    p.add_argument("--data", default=None, help="dataset dir (default: the one the export recorded)")
    p.add_argument("--split", default="test")
    p.add_argument("--num-clips", type=int, default=None, help="default: the export's test views")
    p.add_argument("--num-crops", type=int, default=None, help="default: the export's test views")
    p.add_argument("--batch-size", type=int, default=32, help="clips per forward, views included")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--ema", action="store_true", help="evaluate model_ema.safetensors")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--out", default=None, help="JSON output (default: RUN/eval_<split>.json)")
    args = p.parse_args(argv)
    try:
        return _main(args)
    except UserError as e:
        print(f"msf-scale eval: error: {e}", flush=True)
        return 2


def _main(args: argparse.Namespace) -> int:
    from msf_scale.data import read_dataset_info
    from msf_scale.export import load_model, read_model_config

    ckpt = Path(args.ckpt)
    run_dir = ckpt.parent if ckpt.suffix == ".safetensors" else ckpt
    if not (run_dir / "model_config.json").is_file():
        raise UserPathError(f"{run_dir / 'model_config.json'} is missing: pass a finished run directory, its best/, "
                            "or a model.safetensors next to its model_config.json")
    meta = read_model_config(ckpt)
    acc = build_eval_accelerator()
    precision = args.precision or ("bf16" if acc.device.type == "cuda" else "fp32")
    with acc.main_process_first():
        root = data_root(args.data, {}) if args.data else recorded_root(meta, run_dir)
    views = meta.get("preprocessing", {})
    check_classes(meta, read_dataset_info(root), root)
    model = load_model(ckpt, ema=args.ema, device=acc.device)
    clips = args.num_clips or views.get("num_clips", 1)
    crops = args.num_crops or views.get("num_crops", 1)
    t, s = meta["config"]["num_frames"], meta["config"]["img_size"]
    loader = split_loader(root, args.split, args.batch_size, t, s, args.num_workers, acc.process_index,
                          acc.num_processes, clips, crops)
    res = evaluate_model(model, loader, acc, (clips * crops, 3, t, s, s), autocast_bf16=precision == "bf16")
    res.update(split=args.split, data=root, weights="ema" if args.ema else "model")
    if acc.is_main_process:
        out = Path(args.out) if args.out else run_dir / f"eval_{args.split}.json"
        out.write_text(json.dumps(res, indent=1))
        print(f"{args.split}: top-1 {100 * res['top1']:.2f}%  top-5 {100 * res['top5']:.2f}%  "
              f"({res['num_samples']} videos x {res['views']} views) -> {out}", flush=True)
    del model, loader
    shutdown(acc)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_rank(main))
