"""Triton backend: weight-only int8 / int4 linear kernels (`ops`) and block-sparse flash attention (`sparse_ops`),
registered as `torch.ops.optpass.*` custom ops.

Nothing here imports triton eagerly: `import optpass.backends.triton` always works, `available()`
reports whether triton can be imported, and `optpass.backends.triton.ops` (loaded on first access of
the `ops` attribute, or imported directly) registers the ops with a reference fallback when triton is
missing.  See `ops` for the op signatures and tensor shapes.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = ["available", "ops"]

_available: bool | None = None


def available() -> bool:
    """True when the `triton` package can be imported (it is imported on the first call)."""
    global _available
    if _available is None:
        try:
            _available = importlib.util.find_spec("triton") is not None
            if _available:
                importlib.import_module("triton")
                importlib.import_module("triton.language")
        except Exception:  # missing, blocked, or a broken install
            _available = False
    return _available


def __getattr__(name: str) -> ModuleType:
    if name in ("ops", "sparse_ops"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
