"""`optpass::gemv_int8` / `gemv_int4_packed`: memory-bound weight-only GEMVs for CPU decode.

y[M, N] = x[M, K] @ dequant(W)[N, K].T with fp32 activations and M <= 8 (decode rows).
`optpass::gemv_int8_packed` is the same product on a packed copy of W (`pack_rows`: output channels in vector
lanes) for AVX-512 VNNI CPUs: bit-identical results (exact integer sums in both), and a verify step's rows
cost far less (`benchmarks/verify_kernels.py`: ~27% less at 6 rows, ~34% at 8), since the row layout spends
its time on per-output horizontal sums and per-row activation reloads; one row is no slower within noise.
PyTorch's `_weight_int8pack_mm` streams cold weights at ~12 GB/s on the 2-core AVX-512 machine of
shared/PEERS.md; `csrc/gemv.cpp` (four independent accumulators) reaches ~18-24 GB/s. A float-accumulating int4
variant was slower than aten's tinygemm kernel on this Zen 4 CPU; `gemv_int4_packed` (VNNI, nibbles in output
lanes, `pack_int4_rows`) takes 0.65-0.85x of tinygemm's time over a SmolLM2 step's cold weights at 1-8 rows
(`benchmarks/verify_kernels.py`), with fp32 activations. The ops are
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
# every kernel of the library: the GEMVs here, the decode and prefill attention (`decode_attention.py`,
# `prefill_attention.py`); HEADERS are their shared inlines (part of the calibration's kernel digest)
_SOURCES = sorted(str(p) for p in (Path(__file__).parent / "csrc").glob("*.cpp"))
_HEADERS = sorted(str(p) for p in (Path(__file__).parent / "csrc").glob("*.h"))
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
    from optpass.backends.cpu import decode_attention, prefill_attention

    decode_attention.register_fake()
    if hasattr(torch.ops.optpass, "prefill_attention"):  # AVX-512 BF16 CPUs only
        prefill_attention.register_fake()

    @torch.library.register_fake("optpass::gemv_int8")
    def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0], q.shape[0]), dtype=torch.float32)

    if hasattr(torch.ops.optpass, "gemv_int8_packed"):  # not packed_available(): the build is not recorded yet
        @torch.library.register_fake("optpass::gemv_int8_packed")
        def _(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
            return x.new_empty((x.shape[0], n), dtype=torch.float32)

        @torch.library.register_fake("optpass::gemv_int4_packed")
        def _(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, centre_offset: torch.Tensor,
              n: int) -> torch.Tensor:
            return x.new_empty((x.shape[0], n), dtype=torch.float32)


PACKED_OUT = 32  # output channels per block of the packed layout (two 16-lane vectors)


def packed_available() -> bool:
    """Whether `optpass::gemv_int8_packed` and `gemv_int4_packed` exist: built, on a CPU with AVX-512 VNNI (their
    only kernels)."""
    return available() and hasattr(torch.ops.optpass, "gemv_int8_packed")


def pack_rows(q: torch.Tensor) -> torch.Tensor | None:
    """int8 [N, K] -> the packed layout of `gemv_int8_packed`: [ceil(N / 32), K / 2, 32, 2], output channels in
    vector lanes (rows past N are zero). None where the layout does not apply (odd K)."""
    n, k = q.shape
    if k % 2:
        return None
    blocks = -(-n // PACKED_OUT)
    padded = q.new_zeros(blocks * PACKED_OUT, k)
    padded[:n] = q
    return padded.view(blocks, PACKED_OUT, k // 2, 2).permute(0, 2, 1, 3).contiguous()


MAX_PACKED_GROUP = 256  # inputs per group the packed kernel sums in int32 lanes before scaling


def pack_group_scales(scale: torch.Tensor, group: int) -> torch.Tensor | None:
    """Group scales [N, K / group] -> [ceil(N / 32), K / group, 32], laid out like `pack_rows`' blocks (zero past
    N). None where the packed kernel cannot take the group size."""
    if group % 2 or group > MAX_PACKED_GROUP:
        return None
    n, groups = scale.shape
    blocks = -(-n // PACKED_OUT)
    padded = scale.new_zeros(blocks * PACKED_OUT, groups, dtype=torch.float32)
    padded[:n] = scale
    return padded.view(blocks, PACKED_OUT, groups).transpose(1, 2).contiguous()


_FP16_NORMAL_MIN, _FP16_MAX = 2.0**-14, 65504.0


def pack_int4_rows(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Unpacked int4 values [N, K] (0..15), scale and zero [N, K / group] -> `gemv_int4_packed`'s operands:
    nibbles [ceil(N / 32), K / 4, 64] (per input quad, byte 4 * o + i holds output o's input i in its low nibble
    and output 16 + o's in its high nibble, for the block's 32 outputs), fp16 scale and centre offset
    (8 - zero) * scale packed like `pack_group_scales`.
    None where the kernel cannot take the weight exactly enough: K or the group not a multiple of 4, a group it
    cannot sum, or a scale outside fp16's normal range (there fp16 would round it coarser than tinygemm's bf16)."""
    n, k = q.shape
    magnitude = scale.float().abs()
    smallest = torch.where(magnitude > 0, magnitude, torch.inf).min()  # zero scales (all-zero groups) are exact
    centre_offset = (8.0 - zero.float()) * scale.float()
    if k % 4 or group % 4 or group > MAX_PACKED_GROUP or smallest < _FP16_NORMAL_MIN or \
            magnitude.max() > _FP16_MAX or centre_offset.abs().max() > _FP16_MAX:
        return None
    blocks = -(-n // PACKED_OUT)
    padded = q.new_zeros(blocks * PACKED_OUT, k, dtype=torch.uint8)
    padded[:n] = q.to(torch.uint8)
    halves = padded.view(blocks, 2, PACKED_OUT // 2, k // 4, 4).permute(0, 3, 2, 4, 1)  # [b, quad, out, in, half]
    nibbles = (halves[..., 0] | (halves[..., 1] << 4)).reshape(blocks, k // 4, 2 * PACKED_OUT).contiguous()
    return (nibbles, pack_group_scales(scale.float(), group).half(),
            pack_group_scales(centre_offset, group).half())
