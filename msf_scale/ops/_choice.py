"""Which backend a call of an op asked for: the shared rule of every op's dispatcher.

`auto` (every op's default, and the models') or None means the op's environment variable when it is set, so that
one variable switches every call; an explicit backend name wins over the variable.
"""
from __future__ import annotations

import os


def requested_backend(backend: str | None, env_var: str, known: tuple[str, ...], op: str) -> str:
    backend = (backend or "auto").lower()
    if backend == "auto":
        backend = (os.environ.get(env_var) or "auto").lower()
    if backend not in known:
        raise ValueError(f"unknown {op} backend {backend!r}; expected one of {known}"
                         + (f" (from ${env_var})" if os.environ.get(env_var, "").lower() == backend else ""))
    return backend
