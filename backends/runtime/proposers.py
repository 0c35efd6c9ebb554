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
- `self_draft` (`self_draft.py`): the model itself with some blocks skipped; the engine runs its drafting steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch


class Proposer(Protocol):
    def propose(self, ids: torch.Tensor, k: int) -> torch.Tensor | None:
        """A draft [B, k] continuing `ids` [B, T], or None when no row has a guess."""

    def observe(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """The step's input tokens [B, Q] and its logits [B, Q, V] (for proposers that learn while decoding)."""


@dataclass
class PromptLookup:
    """n-gram lookup with an index built incrementally: each step adds the n-grams its new tokens complete, so a
    proposal costs a few dictionary lookups per row instead of a scan of the whole sequence (at batch 4 and
    1k tokens the scan cost more per step than drafting saved)."""

    max_ngram: int = 3
    min_ngram: int = 2
    _seen: torch.Tensor | None = field(default=None, init=False, repr=False)
    # per row: its tokens so far, and n-gram -> the position of the token that followed its most recent occurrence
    _rows: list[tuple[list[int], dict[tuple[int, ...], int]]] = field(default_factory=list, init=False, repr=False)

    def propose(self, ids: torch.Tensor, k: int) -> torch.Tensor | None:
        self._extend(ids)
        drafts = [self._row(tokens, index, k) for tokens, index in self._rows]
        if all(d is None for d in drafts):
            return None
        return torch.tensor([d if d is not None else [row[-1]] * k for d, (row, _) in zip(drafts, self._rows)],
                            dtype=ids.dtype)

    def _extend(self, ids: torch.Tensor) -> None:
        """Index the tokens of `ids` not seen yet; start over when `ids` does not continue what was seen."""
        seen = 0 if self._seen is None else self._seen.shape[1]
        if self._seen is None or ids.shape[0] != self._seen.shape[0] or ids.shape[1] < seen \
                or not torch.equal(ids[:, :seen], self._seen):
            self._rows, seen = [([], {}) for _ in range(ids.shape[0])], 0
        for (tokens, index), new in zip(self._rows, ids[:, seen:].tolist()):
            for token in new:
                tokens.append(token)
                t = len(tokens)  # the n-grams ending just before this token now have a follower
                for n in range(self.min_ngram, min(self.max_ngram, t - 1) + 1):
                    index[tuple(tokens[t - 1 - n:t - 1])] = t - 1
        self._seen = ids.clone()

    def _row(self, tokens: list[int], index: dict[tuple[int, ...], int], k: int) -> list[int] | None:
        t = len(tokens)
        for n in range(min(self.max_ngram, t - 1), self.min_ngram - 1, -1):
            start = index.get(tuple(tokens[t - n:]))
            if start is not None:  # the most recent earlier match; a short tail is padded with its last token
                draft = tokens[start:start + k]
                return draft + [draft[-1]] * (k - len(draft))
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


def _self_draft(vocab: int, layers: Sequence[int] = ()) -> Proposer:
    from optpass.backends.runtime.self_draft import SelfDraft

    return SelfDraft(tuple(int(i) for i in layers))


# kind -> factory(vocab, **options)
PROPOSERS = {"prompt_lookup": lambda vocab, **options: PromptLookup(**options), "token_recycling": TokenRecycling,
             "self_draft": _self_draft}


def make_proposer(kind: str, vocab: int, **options: int) -> Proposer:
    from optpass.errors import ConfigError

    if kind not in PROPOSERS:
        raise ConfigError(f"unknown proposer {kind!r}; known: {sorted(PROPOSERS)}")
    return PROPOSERS[kind](vocab, **options)
