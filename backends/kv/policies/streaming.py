"""StreamingLLM (Xiao et al., 2023): attention sinks + the most recent tokens. The cache protects the sinks;
scoring by position keeps the newest tokens and evicts the oldest."""

from __future__ import annotations

import torch

from optpass.backends.kv.policies.base import KVPolicy, register_policy


@register_policy
class StreamingPolicy(KVPolicy):
    name = "streaming"

    def prefill_scores(self, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, scaling: float) -> torch.Tensor:
        b, hkv, s, _ = key.shape
        return torch.arange(s, dtype=torch.float32, device=key.device).expand(b, hkv, s).clone()

    def insert_score(self, age: torch.Tensor) -> torch.Tensor:
        return age.float()
