"""Accepting a proposal: the verify step scored the last emitted token and k drafted tokens in one forward
(logits [B, k + 1, V]); this keeps the longest drafted prefix the model itself would have produced, plus the
model's own token after it, so the output is exactly what one-token decoding gives.

- Greedy: draft token i is kept while it equals the (processed) argmax at position i.
- Sampling: a proposer's draft is one token with probability 1 (q = point mass), so speculative sampling
  accepts d_i with probability p_i(d_i) and otherwise draws from the residual max(p_i - q_i, 0), which is p_i
  without d_i, renormalised (Leviathan et al., Chen et al.): each emitted token is distributed exactly as p_i.
- Batches: one accepted length for all unfinished rows (the smallest), so the cache keeps one position.
  A row that accepted more just re-derives those tokens next step; no row's distribution changes, because
  where the batch stops depends only on the other rows' independent draws.
Logits processors run per position on the sequence as it would be at that position (tested against the
one-token path).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList, MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor

from optpass.backends.runtime.sampler import draw

EOS_BANS = (MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor)  # processors that only set EOS to -inf


def banned_tokens(procs: LogitsProcessorList) -> torch.Tensor | None:
    """The only tokens `procs` can move a greedy choice away from, when every processor just bans them (min
    length / min new tokens ban EOS): a raw argmax outside them is the processed argmax too (banning lowers no
    other score, and argmax keeps the first maximum). None when some processor does more."""
    if not len(procs) or not all(isinstance(p, EOS_BANS) for p in procs):
        return None
    return torch.cat([torch.as_tensor(p.eos_token_id).flatten() for p in procs])


def unaffected(argmax: torch.Tensor, banned: torch.Tensor | None) -> bool:
    """Whether the greedy processors cannot change `argmax` (no entry is a banned token); one vectorised test
    instead of two vocabulary-sized processor calls per token (~0.2 ms each at a 49k vocabulary)."""
    return banned is not None and not bool((argmax[..., None] == banned).any())


def accept(ids: torch.Tensor, draft: torch.Tensor, logits: torch.Tensor, argmax: torch.Tensor,
           procs: LogitsProcessorList, sample: bool, limit: int, active: torch.Tensor) -> torch.Tensor:
    """The tokens to emit [B, n + 1], n <= `limit` drafted tokens accepted by every `active` row.
    `ids` [B, T] ends with the verify step's first input; `argmax` [B, k + 1] is the raw logits' argmax."""
    if not sample and not len(procs):
        return _greedy(draft, argmax, limit, active)
    out = []
    for i in range(limit + 1):
        scores = logits[:, i].float()
        if len(procs):
            scores = procs(torch.cat([ids, draft[:, :i]], dim=1), scores)
        if i == limit:
            out.append(draw(scores) if sample else scores.argmax(-1))
            break
        proposed = draft[:, i]
        if sample:
            probs = torch.softmax(scores, dim=-1)
            kept = torch.rand(probs.shape[0]) < probs.gather(1, proposed[:, None]).squeeze(1)
            token = proposed.clone()
            rejected = (~kept).nonzero().squeeze(1)
            if rejected.numel():  # residual: p without the proposed token (finite: p(d) < 1 there)
                residual = scores[rejected].scatter(1, proposed[rejected, None], float("-inf"))
                token[rejected] = draw(residual)
        else:
            token = scores.argmax(-1)
            kept = token == proposed
        out.append(token)
        if not bool((kept | ~active).all()):
            break
    return torch.stack(out, dim=1)


def _greedy(draft: torch.Tensor, argmax: torch.Tensor, limit: int, active: torch.Tensor) -> torch.Tensor:
    match = (argmax[:, :limit] == draft[:, :limit]) | ~active[:, None]
    n = int(match.long().cumprod(-1).sum(-1).min()) if limit else 0
    return argmax[:, :n + 1]


class TokenChoice:
    """How the next token is chosen, for one-token steps (`next`) and verify steps (`accept`)."""

    def __init__(self, procs: LogitsProcessorList | None = None, sample: bool = False) -> None:
        self.procs, self.sample = procs if procs is not None else LogitsProcessorList(), sample
        self.banned = banned_tokens(self.procs)

    def next(self, ids: torch.Tensor, logits: torch.Tensor, argmax: torch.Tensor) -> torch.Tensor:
        """[B] from the last position's logits [B, V] (`argmax` [B]: theirs, computed in the step)."""
        if not self.sample and (not len(self.procs) or unaffected(argmax, self.banned)):
            return argmax
        from optpass.backends.runtime.sampler import choose

        return choose(ids, logits, self.procs, self.sample)

    def accept(self, ids: torch.Tensor, draft: torch.Tensor, logits: torch.Tensor, argmax: torch.Tensor,
               limit: int, active: torch.Tensor) -> torch.Tensor:
        if not self.sample and unaffected(argmax, self.banned):
            return _greedy(draft, argmax, limit, active)
        return accept(ids, draft, logits, argmax, self.procs, self.sample, limit, active)
