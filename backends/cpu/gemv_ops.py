"""`optpass::gemv_int8`: a memory-bound int8 weight-only GEMV for CPU decode.

y[M, N] = x[M, K] @ dequant(W)[N, K].T with fp32 activations and M <= 8 (decode rows).
PyTorch's `_weight_int8pack_mm` streams cold weights at ~12 GB/s on the 2-core AVX-512 machine of
shared/PEERS.md; `csrc/gemv.cpp` (four independent accumulators) reaches ~18-24 GB/s. (An int4 variant was slower than
aten's tinygemm kernel on this Zen 4 CPU, so int4 uses tinygemm.) The op is
registered with the dispatcher in C++, so a compiled decode step calls them with no Python in between;
fake impls here let torch.export / torch.compile trace them as single opaque ops. The library is built
on first use with torch.utils.cpp_extension (~30 s, cached). If the build fails (no compiler),
`available()` is False and callers keep using the aten kernels.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

MAX_ROWS = 8
# every kernel of the library: the GEMVs here and the decode attention (`decode_attention.py`)
_SOURCES = sorted(str(p) for p in (Path(__file__).parent / "csrc").glob("*.cpp"))
CFLAGS, LDFLAGS = ["-O3", "-march=native", "-fopenmp"], ["-fopenmp"]  # benchmarks build older sources alike


_AVAILABLE: bool | None = None  # a plain global, not lru_cache: compiled steps read it (dynamo cannot trace the cache)


def available() -> bool:
    """Build (once) and load the kernels; False when they cannot be built here."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = _build()
    return _AVAILABLE


def _build() -> bool:
    if os.environ.get("OPTPASS_NO_CPP") == "1":
        return False
    try:
        from torch.utils.cpp_extension import load

        from optpass.progress import status

        with status("loading optpass CPU GEMV kernels (built on first use, ~30 s)"):
            load("optpass_gemv", _SOURCES, extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, is_python_module=False,
                 verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler / ninja: fall back to the aten kernels
        warnings.warn(f"optpass: CPU GEMV kernels unavailable ({type(e).__name__}: {e}); using aten kernels")
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    from optpass.backends.cpu.decode_attention import register_fake

    register_fake()

    @torch.library.register_fake("optpass::gemv_int8")
    def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0], q.shape[0]), dtype=torch.float32)
