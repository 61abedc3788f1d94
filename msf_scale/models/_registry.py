"""Name -> constructor registry, so configs and the CLI name models instead of repeating their widths."""
from __future__ import annotations

import difflib
import fnmatch
import warnings
from typing import Callable

_MODELS: dict[str, Callable] = {}


class ModelOptionError(ValueError):
    """A model name, size or option value that cannot build a model: the caller's input, not a bug (train.py turns
    it into its one-line error; a plain ValueError from building a model keeps its traceback)."""


def register_model(fn: Callable) -> Callable:
    if fn.__name__ in _MODELS:
        warnings.warn(f"model {fn.__name__!r} registered twice; the later definition wins")
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, size: str | None = None, **kwargs):
    """Build a registered model: ``create_model("msf_mamba_plus", size="base", num_classes=32)`` or
    ``create_model("msf_mamba_plus_base", ...)``. Keyword arguments override the model config; None means default."""
    full = f"{name}_{size}" if size is not None else name
    if full not in _MODELS and size is not None:
        sizes = sorted(n[len(name) + 1:] for n in _MODELS if n.startswith(name + "_") and "_" not in n[len(name) + 1:])
        variants = sorted({n.rsplit("_", 1)[0] for n in _MODELS})
        if not sizes:
            raise ModelOptionError(f"unknown model variant {name!r}; expected one of {variants}")
        raise ModelOptionError(f"unknown size {size!r} for {name!r}; expected one of {sizes}")
    if full not in _MODELS:
        hint = difflib.get_close_matches(full, _MODELS, n=3, cutoff=0.5)
        raise ModelOptionError(f"unknown model {full!r}" + (f"; did you mean {' or '.join(hint)}?" if hint else "")
                         + f" Registered: {', '.join(list_models())}")
    return _MODELS[full](**{k: v for k, v in kwargs.items() if v is not None})


def build_model(section, num_classes: int):
    """The model a run config's `model` section describes (variant, size, clip geometry, drop path, `arch`
    overrides, gradient checkpointing), for a dataset of `num_classes`. The section is read whole here, so that
    a new model field reaches the model without passing through the training loop."""
    model = create_model(section.variant, size=section.size, num_classes=num_classes,
                         num_frames=section.num_frames, img_size=section.img_size,
                         drop_path_rate=section.drop_path_rate, **section.arch)
    model.set_grad_checkpointing(section.grad_checkpointing)
    return model
