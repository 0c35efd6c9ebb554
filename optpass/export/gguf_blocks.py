"""optpass's canonical quantized weights as GGUF blocks (ggml's `block_q4_1` / `block_q8_0`, 32 weights each
along K), and how exact each mapping is.

- int4 (float zero point) -> Q4_1 {fp16 d, fp16 m, 16 bytes: q[j] | q[j + 16] << 4}, x = q * d + m, with
  d = scale and m = -zero * scale: the 4-bit codes are copied unchanged; only d and m round to fp16 (relative
  error <= 2^-11 each), so a weight moves by at most 2^-11 (15 |d| + |m|). Measured: 0.06 of a quantization
  step, 0.11% of the layer's max |W| at worst on a random tiny Llama; 1e-6 of a step (4.8e-7 absolute) on
  SmolLM2-135M, whose weights come from a Q4_1 GGUF, so optpass's min / max grid recovers its fp16 d and m.
  Groups of 64 / 128 repeat their (d, m) in each of their 32-blocks: no further loss.
- int8 (per channel or per group of a multiple of 32) -> Q8_0 {fp16 d, 32 int8}, x = q * d: codes unchanged,
  d = the channel / group scale rounded to fp16 (relative weight error <= 2^-11).
- float matrices (the embedding, a head kept in float) are written losslessly: Q8_0 when every 32-block
  already sits on a Q8_0 grid (weights dequantized from a Q8_0 GGUF, e.g. SmolLM2's embedding, re-pack
  bit-exactly), else F16 when fp16 holds them exactly, else F32.
Scales outside fp16's range (|s| > 65504) cannot be written: `ExportError`.
"""

from __future__ import annotations

import numpy as np
import torch

from optpass.errors import ExportError
from optpass.export.common import LinearWeights

BLOCK = 32  # ggml's QK4_1 / QK8_0
FP16_MAX = 65504.0


def per_block(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """A per-channel [N] or per-group [N, K / group_size] parameter repeated to one value per 32-block."""
    blocks = in_features // BLOCK
    if t.dim() == 1 or group_size == 0:
        return t.reshape(t.shape[0], 1).expand(t.shape[0], blocks)
    if group_size % BLOCK:
        raise ExportError(f"group size {group_size} is not a multiple of GGUF's {BLOCK}-weight blocks")
    return t.repeat_interleave(group_size // BLOCK, dim=1)


def _fp16(t: torch.Tensor, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()) or float(t.abs().max()) > FP16_MAX:
        raise ExportError(f"{what} has values outside fp16's range (|x| > {FP16_MAX:g}): GGUF stores them as fp16")
    return t.to(torch.float16)


def _bytes(t16: torch.Tensor) -> torch.Tensor:
    """[N, B] fp16 -> [N, B, 2] uint8 (little-endian, as ggml reads it)."""
    return t16.contiguous().view(torch.uint8).view(*t16.shape, 2)


def _check_k(lw: LinearWeights) -> None:
    if lw.in_features % BLOCK:
        raise ExportError(f"{lw.name}: in_features {lw.in_features} is not a multiple of GGUF's {BLOCK}-weight blocks")


def q4_1(lw: LinearWeights) -> tuple[np.ndarray, torch.Tensor]:
    """int4 -> Q4_1 bytes [N, K / 32 * 20] and the weight llama.cpp will compute with [N, K]."""
    _check_k(lw)
    n, k = lw.q.shape
    d = _fp16(per_block(lw.scale, lw.group_size, k), f"{lw.name} scales")
    m = _fp16(per_block(-lw.zero * lw.scale, lw.group_size, k), f"{lw.name} group minimums")
    q = lw.q.to(torch.uint8).view(n, k // BLOCK, BLOCK)
    qs = q[..., : BLOCK // 2] | (q[..., BLOCK // 2:] << 4)
    raw = torch.cat([_bytes(d), _bytes(m), qs], dim=-1).reshape(n, -1)
    weight = (q.float() * d.float()[..., None] + m.float()[..., None]).view(n, k)
    return raw.numpy(), weight


def q8_0(lw: LinearWeights) -> tuple[np.ndarray, torch.Tensor]:
    """int8 -> Q8_0 bytes [N, K / 32 * 34] and the weight llama.cpp will compute with [N, K]."""
    _check_k(lw)
    n, k = lw.q.shape
    d = _fp16(per_block(lw.scale, lw.group_size, k), f"{lw.name} scales")
    q = lw.q.to(torch.int8).view(n, k // BLOCK, BLOCK)
    raw = torch.cat([_bytes(d), q.view(torch.uint8)], dim=-1).reshape(n, -1)
    return raw.numpy(), (q.float() * d.float()[..., None]).view(n, k)


def exact_q8_0(w: torch.Tensor) -> np.ndarray | None:
    """Q8_0 bytes of a float matrix if ggml's own Q8_0 quantization of it (d = amax / 127 in fp16) reproduces it
    bit for bit, else None."""
    n, k = w.shape
    if k % BLOCK:
        return None
    blocks = w.float().reshape(n, k // BLOCK, BLOCK)
    d16 = (blocks.abs().amax(dim=-1) / 127.0).to(torch.float16)
    d = d16.float()
    if not bool(torch.isfinite(d).all()):
        return None
    q = torch.where(d[..., None] > 0, torch.round(blocks / d.clamp_min(1e-30)[..., None]), 0.0).clamp(-127, 127)
    if not torch.equal(q * d[..., None], blocks):
        return None
    raw = torch.cat([_bytes(d16), q.to(torch.int8).view(torch.uint8)], dim=-1).reshape(n, -1)
    return raw.numpy()


def lossless_float(w: torch.Tensor, smallest: bool = True) -> tuple[np.ndarray, str]:
    """(data, GGML type name) for a float matrix: the smallest of Q8_0 / F16 / F32 that holds it exactly, or F32
    (`smallest=False`: llama.cpp then multiplies it in fp32, without quantizing activations for Q8_0)."""
    if smallest and w.dim() == 2 and (raw := exact_q8_0(w)) is not None:
        return raw, "Q8_0"
    w32 = w.detach().float()
    if smallest and bool(torch.isfinite(w32).all()) and float(w32.abs().max()) <= FP16_MAX \
            and torch.equal(w32.half().float(), w32):
        return w32.half().numpy(), "F16"
    return w32.numpy(), "F32"
