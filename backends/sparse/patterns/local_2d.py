"""2D local neighbourhoods for image tokens (sliding-tile / GRAT style): tokens are a row-major `height x width`
grid; a query block attends the key blocks whose tokens lie within `radius` rows and columns of its own. Blocks are
contiguous token runs, so a block spans part of a row (or whole rows): every query in a block shares one key
region. Non-causal (diffusion transformers attend both ways): lower with `causal=False`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from optpass.backends.sparse.layout import num_blocks
from optpass.backends.sparse.patterns import Pattern, register_pattern
from optpass.errors import ConfigError


def _block_extent(height: int, width: int, block: int, device: torch.device) -> tuple[Tensor, ...]:
    """Per block: min / max row and min / max column of its tokens."""
    n = num_blocks(height * width, block)
    tokens = torch.arange(n * block, device=device).clamp(max=height * width - 1).view(n, block)
    rows, cols = tokens // width, tokens % width
    return rows.amin(1), rows.amax(1), cols.amin(1), cols.amax(1)


def _gap(lo_a: Tensor, hi_a: Tensor, lo_b: Tensor, hi_b: Tensor) -> Tensor:
    """[n, n] distance between intervals [lo_a, hi_a] (rows) and [lo_b, hi_b] (columns); 0 if they overlap."""
    return torch.maximum(lo_b[None, :] - hi_a[:, None], lo_a[:, None] - hi_b[None, :]).clamp(min=0)


@register_pattern
@dataclass(frozen=True)
class Local2D(Pattern):
    name = "local_2d"
    height: int = 64  # token grid
    width: int = 64
    radius: int = 8  # tokens, in rows and in columns

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1 or self.radius < 0:
            raise ConfigError(f"local_2d: height={self.height}, width={self.width}, radius={self.radius}; "
                              "a positive grid and radius >= 0")

    def block_mask(self, query: Tensor, key: Tensor, block: int) -> Tensor:
        if query.shape[2] != self.height * self.width:
            raise ConfigError(f"local_2d: {query.shape[2]} tokens, but the grid is {self.height}x{self.width}")
        r0, r1, c0, c1 = _block_extent(self.height, self.width, block, query.device)
        keep = (_gap(r0, r1, r0, r1) <= self.radius) & (_gap(c0, c1, c0, c1) <= self.radius)
        return keep[None, None]
