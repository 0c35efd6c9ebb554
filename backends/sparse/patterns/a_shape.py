"""Sinks + sliding window ("A-shape", StreamingLLM / MInference's Λ-shape): the first `sink` tokens and the
last `window` tokens before each query block."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from optpass.backends.sparse.layout import num_blocks
from optpass.backends.sparse.patterns import Pattern, register_pattern
from optpass.errors import ConfigError


@register_pattern
@dataclass(frozen=True)
class AShape(Pattern):
    name = "a_shape"
    sink: int = 64  # tokens, rounded up to whole blocks
    window: int = 1024  # tokens before the query block (the diagonal block is always kept)

    def __post_init__(self) -> None:
        if self.sink < 0 or self.window < 0:
            raise ConfigError(f"a_shape: sink={self.sink}, window={self.window}; both must be >= 0")

    def block_mask(self, query: Tensor, key: Tensor, block: int) -> Tensor:
        n = num_blocks(query.shape[2], block)
        q = torch.arange(n, device=query.device)[:, None]
        k = torch.arange(n, device=query.device)[None, :]
        keep = (k < num_blocks(self.sink, block)) | ((q - k) * block <= self.window)
        return keep[None, None]
