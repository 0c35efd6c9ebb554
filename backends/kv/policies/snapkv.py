"""SnapKV (Li et al., 2024): the last `window` prompt queries (the observation window, usually the question)
vote for the keys they attend to; votes are pooled over neighbouring positions so that kept tokens come
with their context. Only window x S attention logits are computed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from optpass.backends.kv.policies.base import KVPolicy, grouped_probs, register_policy


@register_policy
class SnapKVPolicy(KVPolicy):
    name = "snapkv"
    accumulates = True  # during decode, keep scoring by received attention
    window = 32
    kernel = 7

    def prefill_scores(self, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, scaling: float) -> torch.Tensor:
        s = key.shape[2]
        w = min(self.window, s)
        votes = grouped_probs(query[:, :, s - w:], key, scaling, causal_offset=s - w, valid=valid).sum(2)
        b, h, _ = votes.shape
        # the observation window itself stays in the cache's full-precision recent window (same default size)
        return F.max_pool1d(votes.view(b * h, 1, s), self.kernel, stride=1, padding=self.kernel // 2).view(b, h, s)
