"""Data: WebDataset shards (schema + writer), the synthetic default dataset, the packer for real video
datasets, and the streaming train/eval loaders. See docs/DATA.md.

Names are imported on first use, so that packer workers and ``msf-scale data synth`` never import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "schema": ["DatasetInfo", "SplitInfo", "read_dataset_info", "write_dataset_info", "MEAN", "STD"],
    "synthetic": ["SynthConfig", "synth_config", "synthesize", "ensure_synthetic", "generate_split"],
    "packer": ["pack", "PackResult"],
    "loader": ["build_train_loader", "build_eval_loader", "TrainLoader", "EvalLoader", "LoaderStats"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'msf_scale.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
