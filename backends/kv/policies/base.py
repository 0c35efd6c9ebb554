"""The eviction-policy interface.

A policy only *scores*; the cache does the rest identically for every policy: at prefill it keeps the
`capacity` best-scored tokens (sink tokens always, padding never; ties go to the older token), and
during decode, once full, it evicts the lowest-scored non-sink token each step (ties: lowest slot).
Higher score = more worth keeping. Policies never need eager attention: the cache hands them the
queries and keys and they compute the attention they need (an observation window, or column sums in
query chunks).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from optpass.errors import ConfigError


class KVPolicy:
    """Scores tokens for keeping. Subclasses set `name` and override `prefill_scores`."""

    name: ClassVar[str]
    # whether each decode step's attention probabilities are added to the tokens' scores (H2O-style)
    accumulates: ClassVar[bool] = False

    def prefill_scores(self, query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, scaling: float) -> torch.Tensor:
        """Scores [B, Hkv, S] for the prompt's tokens. `query` [B, Hq, S, D] (RoPE applied), `key` [B, Hkv, S, D],
        `valid` [B, S] (False for left padding)."""
        raise NotImplementedError

    def insert_score(self, age: torch.Tensor) -> torch.Tensor:
        """Score a token gets when it enters the cache during decode (`age` = its index in the sequence)."""
        return torch.zeros_like(age, dtype=torch.float32)


POLICIES: dict[str, type[KVPolicy]] = {}


def register_policy(cls: type[KVPolicy]) -> type[KVPolicy]:
    POLICIES[cls.name] = cls
    return cls


def get_policy(name: str) -> KVPolicy:
    if name not in POLICIES:
        raise ConfigError(f"unknown KV policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return POLICIES[name]()


def grouped_probs(query: torch.Tensor, key: torch.Tensor, scaling: float, causal_offset: int | None,
                  valid: torch.Tensor) -> torch.Tensor:
    """Softmax attention probabilities of `query` [B, Hq, Q, D] over `key` [B, Hkv, S, D], summed over each
    KV head's query group -> [B, Hkv, Q, S]. `causal_offset`: position of query 0 (None = no causal mask)."""
    b, hq, q, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    grouped = query.view(b, hkv, hq // hkv, q, d)
    logits = torch.einsum("bhgqd,bhsd->bhgqs", grouped.float(), key.float()) * scaling
    mask = ~valid[:, None, None, None, :]
    if causal_offset is not None:
        qpos = torch.arange(q, device=query.device)[:, None] + causal_offset
        mask = mask | (torch.arange(s, device=query.device)[None, :] > qpos)
    probs = logits.masked_fill(mask, float("-inf")).softmax(-1).nan_to_num(0.0)
    return probs.sum(2)
