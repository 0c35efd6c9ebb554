"""The canonical quantized-weight format every backend and the checkpoint share.

int8 weight-only: symmetric per output channel.  W[n, k] ~= q[n, k] * scale[n],  q int8 in [-127, 127].
int4 weight-only: asymmetric per group of `group_size` input channels, with a float zero point.
    W[n, k] ~= (q[n, k] - zero[n, g]) * scale[n, g],  g = k // group_size,  q uint8 in [0, 15], zero fp32;
    a float zero (as in tinygemm / HQQ / GGUF Q4_1's per-block minimum) keeps each group's min exact,
    where an integer zero point would shift the whole grid by up to half a step;
    stored packed two per byte along K: packed[n, j] = q[n, 2j] | q[n, 2j + 1] << 4.
Backends convert from this format to their kernel's layout (tinygemm for CPU, registers for Triton).
"""

from __future__ import annotations

import torch


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: returns (q int8 [N, K], scale fp32 [N])."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric int4 (min/max): returns (q uint8 [N, K], scale fp32 [N, G], zero fp32 [N, G])."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not divisible by group_size {group_size}")
    g = w.float().view(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp_min(1e-12)
    zero = -lo / scale
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15)
    return q.view(n, k).to(torch.uint8), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = q.shape
    g = q.float().view(n, k // group_size, group_size)
    return ((g - zero.float()[..., None]) * scale.float()[..., None]).view(n, k)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] uint8 in [0, 15] -> [N, K/2] uint8, even k in the low nibble."""
    if q.shape[-1] % 2:
        raise ValueError("int4 packing needs an even number of input channels")
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> [N, K] uint8 in [0, 15]."""
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)
