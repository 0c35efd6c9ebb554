"""Real English text that ships with Python (`pydoc_data.topics`, ~700 KB) for perplexity, calibration
and passkey haystacks. No dataset is fetched at run time."""

from __future__ import annotations

import random
from functools import lru_cache
from typing import Any

import torch


@lru_cache(maxsize=1)
def corpus_text() -> str:
    """The pydoc topics, concatenated in sorted-key order, joined by blank lines (as in shared/PEERS.md)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def token_windows(tokenizer: Any, window: int, count: int, offset_windows: int = 0) -> torch.Tensor:
    """`count` non-overlapping windows of `window` token ids ([count, window]), starting after
    `offset_windows` windows, so calibration and evaluation can take disjoint slices."""
    need = (offset_windows + count) * window
    text = corpus_text()
    chars = max(need * 6, 20_000)
    ids = tokenizer(text[: chars], add_special_tokens=False, return_tensors="pt").input_ids[0]
    while ids.numel() < need and chars < len(text):
        chars *= 2
        ids = tokenizer(text[: chars], add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < need:
        raise ValueError(f"corpus has {ids.numel()} tokens, need {need}")
    start = offset_windows * window
    return ids[start : start + count * window].view(count, window)


def sentences(count: int, offset: int = 0, min_words: int = 4) -> list[str]:
    """`count` corpus sentences of varied length (for padded encoder batches), after skipping `offset`."""
    import re

    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", corpus_text())
             if len(s.split()) >= min_words and "\n" not in s.strip()]
    return found[offset: offset + count]


PASSKEY_PREAMBLE = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)


# the question that ends every passkey prompt; KV peers that compress only the context split it off here
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"


def passkey_prompt(tokenizer: Any, context_tokens: int, depth: float, key: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """A haystack of corpus text of about `context_tokens` tokens with the pass key hidden at `depth`
    (0 = start, 1 = end), in the standard passkey format (Mohtashami & Jaggi, 2023), followed by the
    question. Returns (input ids [1, n], expected answer)."""
    rng = random.Random(seed)
    needle = f"\n\nThe pass key is {key}. Remember it. {key} is the pass key.\n\n"
    question = PASSKEY_QUESTION
    budget = context_tokens - len(tokenizer(PASSKEY_PREAMBLE + needle + question).input_ids)
    text = corpus_text()
    start = rng.randrange(0, len(text) // 2)
    filler_ids = tokenizer(text[start : start + budget * 8], add_special_tokens=False).input_ids[:budget]
    cut = int(len(filler_ids) * depth)
    prompt = PASSKEY_PREAMBLE + tokenizer.decode(filler_ids[:cut]) + needle + tokenizer.decode(filler_ids[cut:]) + question
    return tokenizer(prompt, return_tensors="pt").input_ids, str(key)
