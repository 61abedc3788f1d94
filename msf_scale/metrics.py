"""Metric sinks and accounting: one `log(metrics, step)` to JSONL + TensorBoard, top-k, MFU, peak memory."""
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


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Per-sample bool tensors: label within the top-k classes (k clipped to the class count)."""
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    hit = top == labels[:, None]
    return [hit[:, :k].any(dim=-1) for k in ks]


class MetricLogger:
    """Writes on the main process only; `log()` takes plain numbers (call `.item()` before, at log steps)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is a dependency, but keep training if it is broken
                print(f"[msf_scale] TensorBoard disabled ({e}); pip install tensorboard", flush=True)
            else:
                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def truncate_jsonl(path: Path, max_step: int) -> None:
    """On resume, drop rows logged after the checkpoint, so the history reads as one uninterrupted run."""
    rows = read_jsonl(path)
    if any(r.get("step", 0) > max_step for r in rows):
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= max_step))
