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


def choose(ids: torch.Tensor, logits: torch.Tensor, procs: LogitsProcessorList, sample: bool) -> torch.Tensor:
    """Next tokens [B] from `logits` [B, V] given the sequences so far `ids` [B, T]."""
    scores = procs(ids, logits.float()) if len(procs) else logits.float()
    if not sample:
        return scores.argmax(-1)
    return draw(scores)
