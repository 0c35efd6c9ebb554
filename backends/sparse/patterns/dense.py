"""Every causal block: a head the search found no sparse pattern for, kept exact inside a sparse layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from optpass.backends.sparse.layout import causal_blocks, num_blocks
from optpass.backends.sparse.patterns import Pattern, register_pattern


@register_pattern
@dataclass(frozen=True)
class Dense(Pattern):
    name = "dense"

    def block_mask(self, query: Tensor, key: Tensor, block: int) -> Tensor:
        n = num_blocks(query.shape[2], block)
        return causal_blocks(n, query.device)[None, None].expand(1, query.shape[1], n, n)
