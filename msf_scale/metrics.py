"""Metric sinks and accounting: one `log(metrics, step)` to JSONL + the Accelerate trackers, top-k, MFU, peak memory."""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; used only when
# log.peak_tflops is unset. Anything else (CPUs included) gets MFU = None rather than a guess.
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
                     "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def device_peak_tflops(override: float | None, device: torch.device) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in KNOWN_PEAK_TFLOPS.items() if k in name), None)


def train_flops_per_clip(forward_macs: int) -> int:
    """Forward MACs -> training FLOPs: 2 FLOPs per MAC, backward = 2 x forward (PaLM's 6N convention)."""
    return 3 * 2 * int(forward_macs)


def mfu(flops_per_clip: int, clips_per_s_per_device: float, peak_tflops: float | None) -> float | None:
    if peak_tflops is None or not flops_per_clip:
        return None
    return flops_per_clip * clips_per_s_per_device / (peak_tflops * 1e12)


def peak_memory_gb(device: torch.device) -> float:
    """GPU: peak allocated by torch; CPU: the process's peak resident set (includes Python itself)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (2**30 if sys.platform == "darwin" else 2**20)


# Activation bytes per (token x width x block) of one training clip: 67 / 69 / 82 measured for videomamba /
# msf_mamba / msf_mamba_plus tiny at batch 32 by benchmarks/bench_model.py (bf16 autocast, docs/BENCHMARKS.md;
# base at batch 16 gives the same figures within 3%), doubled for fp32 activations on CPU.
ACTIVATION_BYTES = {"videomamba": 67, "msf_mamba": 69, "msf_mamba_plus": 82}


def estimate_train_memory_gb(model_cfg, batch_size: int, processes: int, precision: str = "fp32",
                             grad_checkpointing: bool = False) -> float:
    """Training memory of `processes` CPU processes (GB): activations of batch_size clips from the model's token
    count, width and depth, + weights, gradients and AdamW moments (16 bytes a parameter) + ~1 GB of runtime."""
    t, gh, gw = model_cfg.grid
    d, depth, tokens = model_cfg.embed_dim, model_cfg.depth, t * gh * gw
    per_unit = ACTIVATION_BYTES.get(model_cfg.variant, 82) * (1 if precision == "bf16" else 2)
    act = per_unit * tokens * d * (1 if grad_checkpointing else depth) * batch_size
    if grad_checkpointing:   # each block's input is kept, one block at a time is recomputed
        act += 4 * tokens * d * depth * batch_size
    params = 12 * d * d * depth   # the mixer's matrices dominate: in/out projections 6 d^2, x/dt projections
    return processes * (act + 16 * params + 2**30) / 1e9


def available_memory_gb() -> float | None:
    """RAM free for new processes: MemAvailable, capped by a cgroup (container) limit; None if unknown."""
    free = None
    try:
        import psutil
        free = psutil.virtual_memory().available
    except ImportError:
        try:
            text = Path("/proc/meminfo").read_text()
            free = int(next(l.split()[1] for l in text.splitlines() if l.startswith("MemAvailable:"))) * 1024
        except (OSError, StopIteration, ValueError):
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            free = min(free if free is not None else 2**62, int(limit) - used)
    except (OSError, ValueError):
        pass
    return None if free is None else free / 1e9


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Per-sample bool tensors: label within the top-k classes (k clipped to the class count)."""
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    hit = top == labels[:, None]
    return [hit[:, :k].any(dim=-1) for k in ks]


class MetricLogger:
    """JSONL on the main process, plus the Accelerate trackers of `log.log_with` (TensorBoard, W&B, MLflow...:
    `accelerator.init_trackers` was called by the caller). `log()` takes plain numbers (`.item()` them first)."""

    def __init__(self, run_dir: Path, enabled: bool, accelerator=None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.accelerator = accelerator if accelerator is not None and accelerator.trackers else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.accelerator is not None:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))
                                  and not isinstance(v, bool) and math.isfinite(v)}, step=step)

    def close(self) -> None:
        """Nothing to do: `accelerator.end_training()` closes the trackers."""


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as `section.field` scalars, the form trackers store as hyper-parameters."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def truncate_jsonl(path: Path, max_step: int) -> None:
    """On resume, drop rows logged after the checkpoint, so the history reads as one uninterrupted run."""
    rows = read_jsonl(path)
    if any(r.get("step", 0) > max_step for r in rows):
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= max_step))
