"""Next-token choice on the logits the decode step returns, with transformers' own logits processors.

`processors(config, prompt_len)` builds the same processors, in the same order, that `generate()` builds for
the options the runtime supports (repetition penalty, min length / min new tokens, then for sampling
temperature, top-k, top-p, min-p), so the processed distribution is transformers' by construction (tested
against `generate()`'s own list). Sampling draws with `torch.multinomial` on the global generator, as
`generate()` does, so `torch.manual_seed(s)` before a call reproduces it.

Two exact shortcuts keep sampling near greedy speed on a large vocabulary (a sort of 49k logits took 4.3 ms and
a multinomial over them 1.5 ms here, against a ~23 ms decode step): top-p finds its nucleus among the top-k
logits, widening k until their mass covers p (the same kept set as transformers' sort: a token is kept iff the
mass of the tokens above it is below p), and the draw samples among the tokens the processors left finite.
Both give transformers' distribution; the random stream differs from transformers' full-vocabulary draw, so a
seed reproduces optpass's tokens, not transformers' token for token.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def processors(config: Any, prompt_len: int, eos: list[int]) -> LogitsProcessorList:
    out = LogitsProcessorList()
    eos_t = torch.tensor(eos, dtype=torch.long) if eos else None
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(penalty=config.repetition_penalty))
    if eos_t is not None and config.min_length:
        out.append(MinLengthLogitsProcessor(config.min_length, eos_t))
    if eos_t is not None and config.min_new_tokens:
        out.append(MinNewTokensLengthLogitsProcessor(prompt_len, config.min_new_tokens, eos_t))
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            out.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            out.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
        if config.top_p is not None and config.top_p < 1.0:
            out.append(NucleusByTopK(top_p=config.top_p))
        if config.min_p is not None:
            out.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
    return out


class NucleusByTopK(TopPLogitsWarper):
    """transformers' `TopPLogitsWarper` (min_tokens_to_keep=1) without sorting the whole vocabulary."""

    FIRST_K = 256

    def __init__(self, top_p: float) -> None:
        super().__init__(top_p=top_p, min_tokens_to_keep=1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        log_total = torch.logsumexp(scores, dim=-1, keepdim=True)
        k = min(self.FIRST_K, vocab)
        while True:
            top, index = scores.topk(k, dim=-1)  # descending
            probs = (top - log_total).exp()
            above = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
            # the nucleus ends inside the top k once some token there has `above` >= p (it and all below go)
            if k == vocab or bool((above[:, -1] >= self.top_p).all()):
                break
            k = min(16 * k, vocab)
        keep = above < self.top_p
        keep[:, 0] = True  # min_tokens_to_keep = 1
        out = torch.full_like(scores, self.filter_value)
        return out.scatter_(1, index, torch.where(keep, top, torch.full_like(top, self.filter_value)))


def draw(scores: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(scores), sampling among the finite entries only (same distribution)."""
    probs = torch.softmax(scores, dim=-1)
    rows = []
    for row, p in zip(scores, probs):
        kept = torch.isfinite(row).nonzero().squeeze(1)
        if kept.numel() * 8 >= row.numel():
            rows.append(torch.multinomial(p, num_samples=1))
        else:
            rows.append(kept[torch.multinomial(p[kept], num_samples=1)])
    return torch.cat(rows)


# the sampling warpers in generate()'s order, and the attribute that holds each one's setting
WARPER_SETTING = {TemperatureLogitsWarper: "temperature", TopKLogitsWarper: "top_k", NucleusByTopK: "top_p",
                  MinPLogitsWarper: "min_p"}
WARPERS = tuple(WARPER_SETTING)


def split_warpers(procs: LogitsProcessorList) -> tuple[LogitsProcessorList, list[Any]]:
    """(the processors before the sampling warpers, the trailing warpers), as `processors()` orders them."""
    i = len(procs)
    while i and isinstance(procs[i - 1], WARPERS):
        i -= 1
    return LogitsProcessorList(procs[:i]), list(procs[i:])


def warped_candidates(scores: torch.Tensor, warpers: list[Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The warpers' result on the top candidates only: (token ids [B, k], their warped scores [B, k], -inf where
    dropped). Temperature, top-k, top-p and min-p each keep a prefix of the tokens sorted by score, so the kept
    set is found in a top-k slice widened until every row's set ends inside it: no vocabulary-sized softmax,
    scatter or processor-list call per token. None when the warpers are in another order or do not truncate."""
    settings = {"temperature": 1.0, "top_k": None, "top_p": 1.0, "min_p": None}
    for w in warpers:
        setting = WARPER_SETTING[type(w)]
        settings[setting] = getattr(w, setting)
    temperature, top_k, top_p, min_p = settings.values()
    in_order = [type(w) for w in warpers] == [t for t in WARPERS if any(type(w) is t for w in warpers)]
    if not in_order or (top_k is None and top_p >= 1.0 and min_p is None):
        return None
    vocab = scores.shape[-1]
    support = min(top_k, vocab) if top_k is not None else vocab
    scores = scores / temperature if temperature != 1.0 else scores
    # top-k given: its whole set at once (the nucleus renormalises over it); else widen from FIRST_K
    k = support if top_k is not None else min(NucleusByTopK.FIRST_K, vocab)
    log_total = torch.logsumexp(scores, dim=-1, keepdim=True) if k < support and top_p < 1.0 else None
    while True:
        top, index = scores.topk(k, dim=-1)  # descending
        keep = torch.ones_like(top, dtype=torch.bool)
        if top_p < 1.0:
            total = torch.logsumexp(top, dim=-1, keepdim=True) if k == support else log_total
            probs = (top - total).exp()
            keep = probs.cumsum(-1) - probs < top_p  # the mass above a kept token is below p
        if min_p is not None:  # p_i >= min_p * p_max  <=>  s_i >= s_max + log(min_p), normalisation aside
            keep &= top >= top[:, :1] + math.log(min_p)
        keep[:, 0] = True  # min_tokens_to_keep = 1
        if k == support or not bool(keep[:, -1].any()):
            return index, torch.where(keep, top, torch.full_like(top, float("-inf")))
        k = min(16 * k, support)


def draw_warped(scores: torch.Tensor, warpers: list[Any]) -> torch.Tensor:
    """One token per row from softmax(warpers(scores)): among `warped_candidates` when it applies."""
    found = warped_candidates(scores, warpers)
    if found is None:
        return draw(LogitsProcessorList(warpers)(None, scores))
    index, kept = found
    return index.gather(1, torch.multinomial(torch.softmax(kept, dim=-1), num_samples=1)).squeeze(1)


def choose(ids: torch.Tensor, logits: torch.Tensor, procs: LogitsProcessorList, sample: bool) -> torch.Tensor:
    """Next tokens [B] from `logits` [B, V] given the sequences so far `ids` [B, T]."""
    if not sample:
        return (procs(ids, logits.float()) if len(procs) else logits.float()).argmax(-1)
    before, warpers = split_warpers(procs)
    scores = before(ids, logits.float()) if len(before) else logits.float()
    return draw_warped(scores, warpers) if warpers else draw(scores)
