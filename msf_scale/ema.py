"""Exponential moving average of the weights, kept as a separate fp32 model (timm's ModelEmaV3 idea).

Built before `accelerator.prepare`, as a copy of the bare model (a copy after it would copy the DDP or
DeepSpeed wrapper, and under ZeRO only a shard), and updated from the prepared model's unwrapped parameters after
every optimizer update. ZeRO-3 partitions the parameters, so each
rank holds only a shard; rather than gathering the whole model every step we refuse it with a clear error.
It is registered for checkpointing, evaluated separately and exported as `model_ema.safetensors`.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    def __init__(self, model: nn.Module, decay: float, device: torch.device, zero_stage: int = 0):
        if zero_stage == 3:
            raise ValueError("train.ema is not supported with ZeRO-3 (parameters are partitioned); "
                             "use dist.zero_stage 2 or set train.ema false")
        self.decay = decay
        self.module = copy.deepcopy(model).to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- decay * ema + (1 - decay) * w, with a warm-up (1 + n) / (10 + n) so early weights fade fast."""
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        src = dict(model.named_parameters())
        for name, p in self.module.named_parameters():
            p.lerp_(src[name].detach().to(p.dtype), 1 - d)
        src_b = dict(model.named_buffers())
        for name, b in self.module.named_buffers():
            b.copy_(src_b[name])

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
