"""How fast does each variant learn the synthetic task, per difficulty? The calibration behind the CPU demo.

    python benchmarks/learnability.py --variants msf_mamba,videomamba --steps 300 --motion-px 2,1 \
        --model.patch_size 16 --img 32

Generates each difficulty's train/test split in memory (msf_scale.data's generator, disjoint test subjects),
trains a fresh model with the recipe's optimiser (AdamW, warm-up + cosine, label smoothing) for --steps steps
of random batches with random horizontal-flip-free sampling, and reports test top-1 with wall-clock time.
No loader, no augmentation: this isolates model + recipe + data difficulty. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from msf_scale.data.schema import MEAN, STD
from msf_scale.data.synthetic import SynthConfig, generate_split
from msf_scale.models import create_model


def to_input(videos: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(videos).float().div_(255).permute(0, 4, 1, 2, 3)       # [N, 3, T, H, W]
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1, 1)


def top1(model, xte, yte) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(xte[i:i + 64]).argmax(-1) for i in range(0, len(yte), 64)])
    model.train()
    return round((pred == yte).float().mean().item() * 100, 1)


def run(variant, data, args, overrides):
    (xtr, ytr), (xte, yte) = ((x.to(args.device), y.to(args.device)) for x, y in data)
    torch.manual_seed(args.seed)
    model = create_model(variant, size=args.size, num_classes=int(ytr.max()) + 1, num_frames=xtr.shape[2],
                         img_size=xtr.shape[-1], **overrides).to(args.device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n not in model.no_weight_decay()]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and n not in model.no_weight_decay())]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.999))
    warm = max(1, int(args.warmup * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warm) / max(1, args.steps - warm)))))
    g = torch.Generator().manual_seed(args.seed)
    curve = []
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        idx = torch.randint(0, len(ytr), (args.batch,), generator=g).to(args.device)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            loss = torch.nn.functional.cross_entropy(model(xtr[idx]).float(), ytr[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if args.verbose and (step + 1) % 25 == 0:
            print(f"  step {step + 1}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            curve.append((step + 1, top1(model, xte, yte)))
    train_s = time.time() - t0
    test_acc = top1(model, xte, yte)
    curve.append((args.steps, test_acc))
    train_acc = top1(model, xtr[:len(yte)], ytr[:len(yte)])  # as many train clips as test clips
    return {"variant": variant, "top1": test_acc, "train_top1": train_acc, "curve": curve,
            "final_loss": round(loss.item(), 3), "train_s": round(train_s, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="msf_mamba,videomamba")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--img", type=int, default=32)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--motion-px", default="4.0", help="comma list: one row per value")
    ap.add_argument("--object-px", type=float, default=14.0)
    ap.add_argument("--noise-std", type=float, default=3.0)
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-per-class", type=int, default=40)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=float, default=0.1, help="fraction of steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--verbose", action="store_true", help="print the loss every 25 steps")
    ap.add_argument("--eval-every", type=int, default=0, help="also record test top-1 every N steps")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--object-px-list", default=None, help="comma list paired with --motion-px")
    args, rest = ap.parse_known_args(argv)
    overrides, synth = {}, {}   # --model.FIELD / --synth.FIELD VALUE pairs: model config / SynthConfig
    for k, v in zip(rest[::2], rest[1::2]):
        section, _, field = k[2:].partition(".")
        if section not in ("model", "synth") or not field:
            ap.error(f"unknown argument {k}")
        value = json.loads(v) if v[:1] in "0123456789-[{tf" else v
        (overrides if section == "model" else synth)[field] = value
    rows = []
    print("| motion px | object px | variant | test top-1 (%) | top-1 by step | train top-1 (%) | final train loss"
          " | train time (s) |")
    print("|---:|---:|---|---:|---|---:|---:|---:|")
    motions = list(map(float, args.motion_px.split(",")))
    objects = (list(map(float, args.object_px_list.split(","))) if args.object_px_list
               else [args.object_px] * len(motions))
    for motion, obj in zip(motions, objects):
        cfg = SynthConfig(size=args.img, num_frames=args.frames, motion_px=motion, object_px=obj,
                          noise_std=args.noise_std, train_per_class=args.train_per_class,
                          test_per_class=args.test_per_class, seed=args.seed, **synth)
        splits = []
        for split in ("train", "test"):
            v, y, _ = generate_split(cfg, split)
            splits.append((to_input(v), torch.from_numpy(y)))
        for variant in args.variants.split(","):
            r = {"motion_px": motion, "object_px": obj, **run(variant, splits, args, overrides)}
            rows.append(r)
            curve = " ".join(f"{s}:{a}" for s, a in r["curve"])
            print(f"| {motion} | {obj} | {variant} | {r['top1']} | {curve} | {r['train_top1']} | {r['final_loss']} "
                  f"| {r['train_s']} |",
                  flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "overrides": overrides, "synth": synth, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
