"""Proposers: cheap guesses of the next k tokens, which the runtime verifies with the full model in one step.

A proposer only proposes; `verify.py` accepts the longest prefix the model agrees with, so every proposer is
lossless by construction (vLLM's proposer / verifier split). A proposer that has nothing to offer returns None
and the runtime takes a plain one-token step (no verify cost where there is no guess).

- `PromptLookup`: the last n tokens (n from `max_ngram` down to `min_ngram`) matched against everything so far
  (prompt and generated text); the tokens that followed the most recent earlier match are the draft. Pays where
  the output copies its input (summaries, answers quoting a passage, code edits).
- `TokenRecycling`: a table of the model's own top candidates after each token, filled from the decode
  steps' logits (a token's successors seen before are likely again); the draft follows the table's first
  choice from the last token. ~V x `width` int32 entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class Proposer(Protocol):
    def propose(self, ids: torch.Tensor, k: int) -> torch.Tensor | None:
        """A draft [B, k] continuing `ids` [B, T], or None when no row has a guess."""

    def observe(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """The step's input tokens [B, Q] and its logits [B, Q, V] (for proposers that learn while decoding)."""


@dataclass
class PromptLookup:
    max_ngram: int = 3
    min_ngram: int = 2

    def propose(self, ids: torch.Tensor, k: int) -> torch.Tensor | None:
        drafts = [self._row(row, k) for row in ids]
        if all(d is None for d in drafts):
            return None
        fill = ids[:, -1:]
        return torch.stack([d if d is not None else fill[i].expand(k) for i, d in enumerate(drafts)])

    def _row(self, row: torch.Tensor, k: int) -> torch.Tensor | None:
        t = row.shape[0]
        for n in range(min(self.max_ngram, t - 1), self.min_ngram - 1, -1):
            windows = row[: t - 1].unfold(0, n, 1) if t - 1 >= n else None  # every earlier n-gram
            if windows is None:
                continue
            hits = (windows == row[t - n:]).all(-1).nonzero().squeeze(1)
            hits = hits[hits + n < t]  # a match must have at least one following token
            if hits.numel():
                start = int(hits[-1]) + n  # the most recent match
                draft = row[start:start + k]
                if draft.numel() < k:  # pad a short tail with its last token (the verifier cuts it)
                    draft = torch.cat([draft, draft[-1:].expand(k - draft.numel())])
                return draft
        return None

    def observe(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        pass


class TokenRecycling:
    """Successor table [V, width] of the model's top-`width` tokens after each token, -1 until seen."""

    def __init__(self, vocab: int, width: int = 4) -> None:
        self.table = torch.full((vocab, width), -1, dtype=torch.long)
        self.width = width

    def propose(self, ids: torch.Tensor, k: int) -> torch.Tensor | None:
        last = ids[:, -1]
        if bool((self.table[last, 0] < 0).all()):
            return None
        draft, token = [], last
        for _ in range(k):
            nxt = self.table[token, 0]
            token = torch.where(nxt >= 0, nxt, token)
            draft.append(token)
        return torch.stack(draft, dim=1)

    def observe(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        top = logits.topk(self.width, dim=-1).indices  # [B, Q, width]
        self.table[tokens.reshape(-1)] = top.reshape(-1, self.width)


# kind -> factory(vocab, **options)
PROPOSERS = {"prompt_lookup": lambda vocab, **options: PromptLookup(**options), "token_recycling": TokenRecycling}


def make_proposer(kind: str, vocab: int, **options: int) -> Proposer:
    from optpass.errors import ConfigError

    if kind not in PROPOSERS:
        raise ConfigError(f"unknown proposer {kind!r}; known: {sorted(PROPOSERS)}")
    return PROPOSERS[kind](vocab, **options)
