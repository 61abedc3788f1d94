"""Which backend a call of an op asked for: the shared rule of every op's dispatcher; and whether fp32 matmuls may
use TF32 (the Triton kernels follow torch's setting).

`auto` (every op's default, and the models') or None means the op's environment variable when it is set, so that
one variable switches every call; an explicit backend name wins over the variable.
"""
from __future__ import annotations

import os

import torch


def requested_backend(backend: str | None, env_var: str, known: tuple[str, ...], op: str) -> str:
    backend = (backend or "auto").lower()
    if backend == "auto":
        backend = (os.environ.get(env_var) or "auto").lower()
    if backend not in known:
        raise ValueError(f"unknown {op} backend {backend!r}; expected one of {known}"
                         + (f" (from ${env_var})" if os.environ.get(env_var, "").lower() == backend else ""))
    return backend


class EnvChoiceError(ValueError):
    """A bad value of an MSF_SCALE_* form variable: a user's mistake. ``user_error`` tells the command line to print
    it as one line and exit 2, as it does msf_scale.config.UserError (ops import nothing outside ops)."""
    user_error = True


def env_choice(env_var: str, choices: tuple[str, ...], default: str, environ=os.environ) -> str:
    """$env_var's value, one of ``choices`` (``default`` when unset): a form read once at import (the conv1d's and
    the patch embedding's compiled-inference forms, the mixer's inference layout); anything else is refused in one
    line (EnvChoiceError)."""
    value = environ.get(env_var, default)
    if value not in choices:
        raise EnvChoiceError(f"{env_var} must be {' or '.join(choices)}, got {value!r}")
    return value


def tf32_matmul_allowed() -> bool:
    """torch's TF32 setting for fp32 matmuls, through either API: the legacy flag raises once the new
    ``fp32_precision`` one has been set."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        return torch.backends.cuda.matmul.fp32_precision == "tf32"
