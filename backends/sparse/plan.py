"""What the sparse-attention pass decided for one attention layer: a pattern per query head and the prefill
length from which the layer runs sparse (the cost model's crossover; shorter prefills stay dense)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from optpass.backends.sparse.patterns import Pattern, make_pattern


@dataclass(frozen=True)
class LayerSparsity:
    heads: tuple[dict[str, Any], ...]  # per query head, a pattern record ({"name": "a_shape", "window": 512})
    min_len: int  # prefill length from which this layer runs sparse
    block: int = 64
    _groups: list[tuple[Pattern, Tensor]] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_spec: dict[str, list[int]] = {}
        for head, spec in enumerate(self.heads):
            by_spec.setdefault(repr(sorted(spec.items())), []).append(head)
        for heads in by_spec.values():
            self._groups.append((make_pattern(self.heads[heads[0]]), torch.tensor(heads)))

    def applies(self, q_len: int) -> bool:
        return q_len >= self.min_len

    def block_mask(self, query: Tensor, key: Tensor) -> Tensor:
        """keep [B, H, nQ, nK] for this call: each group of heads sharing a pattern asks it once."""
        batch, heads, seq, _ = query.shape
        if key.shape[1] != heads:
            key = key.repeat_interleave(heads // key.shape[1], 1)
        keep = None
        for pattern, idx in self._groups:
            part = pattern.block_mask(query[:, idx] if pattern.online else query[:, :1],
                                      key[:, idx] if pattern.online else key[:, :1], self.block)
            if keep is None:
                keep = torch.zeros(batch, heads, *part.shape[-2:], dtype=torch.bool, device=query.device)
            keep[:, idx] = part.expand(batch, len(idx), *part.shape[-2:])
        return keep

    def to_dict(self) -> dict[str, Any]:
        return {"heads": [dict(h) for h in self.heads], "min_len": self.min_len, "block": self.block}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerSparsity:
        return cls(tuple(dict(h) for h in data["heads"]), int(data["min_len"]), int(data.get("block", 64)))
