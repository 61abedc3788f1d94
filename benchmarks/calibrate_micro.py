"""Fast in-memory trainings on the micro preset: calibrate its difficulty and explore what a model needs.

    python benchmarks/calibrate_micro.py --set gesture_px=20 --epochs 150                  # cnn3d, the calibration
    python benchmarks/calibrate_micro.py --model msf_mamba --arch stem=conv --epochs 150 --cache /tmp/microcache

Renders the micro preset (``--set field=value`` overrides; ``--cache DIR`` keeps the rendered clips as .npy so that
several models reuse one rendering), keeps every clip on the device as uint8, and trains one model with the loader's
temporal augmentation (T frames by random segment offsets, no crop) and AdamW + warm-up + cosine, bf16 autocast on
CUDA, gradient clipping 1.0, weight decay off for the model's ``no_weight_decay`` set. It prints held-out test top-1
every ``--eval-every`` epochs and writes the curve as JSON (``--out``). This bypasses the data loader, so that a
calibration sweep of many configs fits one GPU call; train.py (``benchmarks/fine_motion.py``) gives the figures of
record.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from msf_scale.data.schema import MEAN, STD
from msf_scale.data.synthetic import SynthConfig, generate_split, synth_config
from msf_scale.data.transforms import eval_indices, temporal_indices
from msf_scale.models import create_model


def parse_sets(pairs: list[str], types: dict[str, str] | None = None) -> dict:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``: ints, floats and booleans where they parse, else strings."""
    out = {}
    for s in pairs:
        k, v = s.split("=", 1)
        for cast in (int, float):
            try:
                out[k] = cast(v)
                break
            except ValueError:
                pass
        else:
            out[k] = {"true": True, "false": False}.get(v.lower(), v)
        if types and types.get(k, "").startswith("float"):
            out[k] = float(out[k])
    return out


def load_split(cfg: SynthConfig, split: str, cache: str | None, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Rendered clips and labels of a split, from ``cache/<digest>`` when present (rendering is the slow part)."""
    if cache:
        d = Path(cache) / cfg.digest()
        if (d / f"{split}_y.npy").exists():
            return np.load(d / f"{split}_x.npy", mmap_mode="r"), np.load(d / f"{split}_y.npy")
    x, y, _ = generate_split(cfg, split, workers)
    if cache:
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / f"{split}_x.tmp.npy", x)
        np.save(d / f"{split}_y.tmp.npy", y)
        (d / f"{split}_x.tmp.npy").rename(d / f"{split}_x.npy")
        (d / f"{split}_y.tmp.npy").rename(d / f"{split}_y.npy")
    return x, y


class DeviceClips:
    """uint8 clips [N, T, S, S, 3] on the device; ``batch(ids, frame_idx)`` -> normalised float [B, 3, F, S, S]."""

    def __init__(self, videos: np.ndarray, device: str):
        self.v = torch.from_numpy(np.array(videos)).to(device)
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1, 1)
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1, 1)

    def batch(self, ids: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        x = self.v[ids[:, None], frames]                     # [B, F, S, S, 3]
        x = x.permute(0, 4, 1, 2, 3).float().div_(255)
        return (x - self.mean) / self.std


def param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or n in skip or n.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def capture(step, side: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
    """Record one whole training step (forward, backward, clipping, AdamW) as a CUDA graph. Tiny models at 112 px
    are launch-bound: a replay costs one launch instead of thousands. PyTorch's whole-network recipe: the eager
    warm-up steps ran on the same side stream, and the gradients are None at capture, so the graph owns them."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        step()
    return graph


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", action="append", default=[], help="SynthConfig override field=value")
    ap.add_argument("--model", default="cnn3d", help="registered variant (cnn3d, msf_mamba, videomamba, ...)")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--arch", action="append", default=[], help="model config override field=value")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak lr at --batch (not per 256)")
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None, help="directory for rendered clips (shared between runs)")
    ap.add_argument("--workers", type=int, default=8, help="rendering processes")
    ap.add_argument("--out", default=None, help="write the curve and settings as JSON here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--render-only", action="store_true", help="fill --cache and exit")
    ap.add_argument("--graph", action="store_true", help="CUDA: replay each training step as one CUDA graph")
    ap.add_argument("--temporal", choices=("random", "fixed"), default="random",
                    help="training frames: random offset per segment (the loader's) or the fixed centre stride")
    args = ap.parse_args()
    over = parse_sets(args.set, {f.name: str(f.type) for f in fields(SynthConfig)})
    cfg = synth_config("micro", **over)
    t0 = time.time()
    xtr, ytr = load_split(cfg, "train", args.cache, args.workers)
    xte, yte = load_split(cfg, "test", args.cache, args.workers)
    t_render = time.time() - t0
    print(f"{len(ytr)} + {len(yte)} clips ready in {t_render:.0f} s: {over}", flush=True)
    if args.render_only:
        return
    dev = args.device
    tr, te = DeviceClips(xtr, dev), DeviceClips(xte, dev)
    ytr_t, yte_t = torch.from_numpy(ytr).to(dev), torch.from_numpy(yte).to(dev)
    te_frames = torch.tensor(eval_indices(cfg.num_frames, args.frames, 0, 1), device=dev).expand(len(yte), -1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    arch = parse_sets(args.arch)
    model = create_model(args.model, size=args.size, num_classes=cfg.num_classes, num_frames=args.frames,
                         img_size=cfg.size, **arch).to(dev)
    graphable = args.graph and dev.startswith("cuda")
    args.graph = graphable
    # capturable AdamW with a tensor lr: a replayed graph reads the lr from device memory, so the schedule still moves
    opt = torch.optim.AdamW(param_groups(model, args.wd),
                            torch.tensor(args.lr, device=dev) if graphable else args.lr, capturable=graphable)
    steps_per_epoch = len(ytr) // args.batch
    steps = args.epochs * steps_per_epoch
    warm = max(1, int(steps * args.warmup))

    def lr_factor(s: int) -> float:
        return min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))

    train_fixed = torch.tensor(eval_indices(cfg.num_frames, args.frames, 0, 1), device=dev)[None]
    amp = dict(device_type="cuda", dtype=torch.bfloat16, enabled=dev.startswith("cuda"), cache_enabled=False)
    lr0 = [float(g["lr"]) for g in opt.param_groups]
    correct = torch.zeros((), device=dev)   # summed on the device: no host sync per step
    loss_sum = torch.zeros((), device=dev)
    x_in = torch.zeros(args.batch, 3, args.frames, cfg.size, cfg.size, device=dev)   # static: a graph reads these
    y_in = torch.zeros(args.batch, dtype=torch.long, device=dev)

    def step() -> None:
        with torch.autocast(**amp):
            logits = model(x_in)
        loss = torch.nn.functional.cross_entropy(logits.float(), y_in)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        correct.add_((logits.argmax(1) == y_in).sum())
        loss_sum.add_(loss.detach() * args.batch)

    graph, graph_note = None, "eager"
    side = torch.cuda.Stream() if args.graph else None
    curve = []
    t_train = time.time()
    done = 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        correct.zero_()
        loss_sum.zero_()
        for b in torch.randperm(len(ytr), device=dev)[: steps_per_epoch * args.batch].split(args.batch):
            if args.temporal == "fixed":
                frames = train_fixed.expand(len(b), -1)
            else:
                frames = torch.tensor([temporal_indices(cfg.num_frames, args.frames, rng.random(args.frames))
                                       for _ in range(len(b))], device=dev)
            x_in.copy_(tr.batch(b, frames))
            y_in.copy_(ytr_t[b])
            scale = lr_factor(done)
            for g, base in zip(opt.param_groups, lr0):
                if isinstance(g["lr"], torch.Tensor):
                    g["lr"].fill_(base * scale)
                else:
                    g["lr"] = base * scale
            if graph is not None:
                graph.replay()
            elif args.graph and done >= 3 and graph_note == "eager":   # 3 eager steps first (optimizer state)
                opt.zero_grad(set_to_none=True)
                side.wait_stream(torch.cuda.current_stream())
                try:
                    graph = capture(step, side)
                    graph_note = "cuda graph"
                except Exception as e:   # a measurement tool: say why, and go on eagerly
                    graph_note = f"eager (capture failed: {type(e).__name__}: {e})"[:300]
                    print(graph_note, flush=True)
                torch.cuda.current_stream().wait_stream(side)
                torch.cuda.synchronize()
                if graph is not None:
                    graph.replay()
                else:
                    opt.zero_grad(set_to_none=True)
                    step()
            elif args.graph:   # the eager warm-up steps run on the capture's side stream
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    opt.zero_grad(set_to_none=True)
                    step()
                torch.cuda.current_stream().wait_stream(side)
            else:
                opt.zero_grad(set_to_none=True)
                step()
            done += 1
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            model.eval()
            with torch.no_grad(), torch.autocast(**amp):
                idx = torch.arange(len(yte), device=dev)
                pred = torch.cat([model(te.batch(i, te_frames[i])).argmax(1) for i in idx.split(64)])
            n = steps_per_epoch * args.batch
            row = dict(epoch=epoch, train_loss=loss_sum.item() / n, train_top1=100 * correct.item() / n,
                       test_top1=100 * pred.eq(yte_t).float().mean().item(), seconds=time.time() - t_train)
            curve.append(row)
            print(f"epoch {epoch}: train loss {row['train_loss']:.3f} top-1 {row['train_top1']:.1f}%, test top-1 "
                  f"{row['test_top1']:.1f}%  ({row['seconds']:.0f} s, {graph_note})", flush=True)
    result = dict(model=args.model, size=args.size, arch=arch, data=over, seed=args.seed, epochs=args.epochs,
                  lr=args.lr, wd=args.wd, warmup=args.warmup, temporal=args.temporal, execution=graph_note, batch=args.batch, frames=args.frames, render_s=t_render,
                  train_s=time.time() - t_train, params=sum(p.numel() for p in model.parameters()), curve=curve,
                  device=torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
