"""Next-token choice on the logits the decode step returns, with transformers' own logits processors.

`processors(config, prompt_len)` builds the same processors, in the same order, that `generate()` builds for
the options the runtime supports (repetition penalty, min length / min new tokens, then for sampling
temperature, top-k, top-p, min-p), so the processed distribution is transformers' by construction (tested
against `generate()`'s own list). Sampling draws with `torch.multinomial` on the global generator, as
`generate()` does, so `torch.manual_seed(s)` before a call reproduces it.
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
            out.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
        if config.min_p is not None:
            out.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
    return out


def choose(ids: torch.Tensor, logits: torch.Tensor, procs: LogitsProcessorList, sample: bool) -> torch.Tensor:
    """Next tokens [B] from `logits` [B, V] given the sequences so far `ids` [B, T]."""
    scores = procs(ids, logits.float()) if len(procs) else logits.float()
    if not sample:
        return scores.argmax(-1)
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
