"""The canonical quantized-weight format every backend and the checkpoint share.

int8 weight-only: symmetric per output channel, W[n, k] ~= q[n, k] * scale[n], or per group of `group_size`
    inputs, W[n, k] ~= q[n, k] * scale[n, k // group_size] (scale [N, G]); q int8 in [-127, 127]. Group scales
    follow weights whose range varies along K (GGUF-derived weights carry a scale per 32 inputs).
int4 weight-only: asymmetric per group of `group_size` input channels, with a float zero point.
    W[n, k] ~= (q[n, k] - zero[n, g]) * scale[n, g],  g = k // group_size,  q uint8 in [0, 15], zero fp32;
    a float zero (as in tinygemm / HQQ / GGUF Q4_1's per-block minimum) keeps each group's min exact,
    where an integer zero point would shift the whole grid by up to half a step;
    stored packed two per byte along K: packed[n, j] = q[n, 2j] | q[n, 2j + 1] << 4.
Backends convert from this format to their kernel's layout (tinygemm for CPU, registers for Triton).
"""

from __future__ import annotations

import torch


def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: returns (q int8 [N, K], scale fp32 [N], or [N, K / group_size] with a group size)."""
    w = w.float()
    n, k = w.shape
    if not group_size:
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
        return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale
    if k % group_size:
        raise ValueError(f"in_features {k} is not divisible by group_size {group_size}")
    g = w.view(n, k // group_size, group_size)
    amax = g.abs().amax(dim=-1).clamp_min(1e-12)
    scale = _coarsest_exact_grid(g / amax[..., None]) * amax
    q = torch.round(g / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q.view(n, k), scale


GRID_LEVELS = 31  # coarsest grids searched: up to 5-bit symmetric (GGUF Q5_0 / Q4_0 blocks)


def _coarsest_exact_grid(unit: torch.Tensor, tol: float = 1e-4) -> torch.Tensor:
    """Per group of `unit` = w / amax in [-1, 1]: 1 / L for the smallest L <= GRID_LEVELS with every value an
    integer multiple of 1 / L (a group that already sits on a coarse grid, e.g. a dequantized Q5_0 block, then
    re-packs with no error at all), else 1 / 127 (plain symmetric int8)."""
    step = torch.full(unit.shape[:-1], 1 / 127.0)
    found = torch.zeros(unit.shape[:-1], dtype=torch.bool)
    for levels in range(1, GRID_LEVELS + 1):
        scaled = unit * levels
        exact = (scaled - scaled.round()).abs().amax(dim=-1) < tol
        new = exact & ~found
        step[new] = 1.0 / levels
        found |= exact
        if bool(found.all()):
            break
    return step


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if scale.dim() == 1:
        return q.float() * scale.float()[:, None]
    n, k = q.shape
    return (q.float().view(n, scale.shape[1], -1) * scale.float()[..., None]).view(n, k)


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
