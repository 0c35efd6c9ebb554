"""Heavy hitters (H2O, Zhang et al., 2023; Keyformer-style accumulated scores): a token's score is the attention
it has received, summed over every query so far. At prefill the column sums are computed in query chunks
(never the full S x S matrix); during decode the cache adds each step's attention probabilities."""

from __future__ import annotations

import torch

from optpass.backends.kv.policies.base import KVPolicy, grouped_probs, register_policy

_CHUNK = 256


@register_policy
class HeavyHitterPolicy(KVPolicy):
    name = "h2o"
    accumulates = True

    def prefill_scores(self, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, scaling: float) -> torch.Tensor:
        s = key.shape[2]
        total = torch.zeros(key.shape[:3], dtype=torch.float32, device=key.device)
        for start in range(0, s, _CHUNK):
            chunk = query[:, :, start:start + _CHUNK]
            total += grouped_probs(chunk, key, scaling, causal_offset=start, valid=valid).sum(2)
        return total
