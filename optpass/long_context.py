"""Quality at long context, shared by the passes that change what far-away tokens see (sparse attention,
local layers): corpus windows of a given length and the perplexity / KL / top-1 of their last `EVAL_TAIL`
positions (those that see the most context) against the dense model's logits."""

from __future__ import annotations

import torch
from torch import nn

from optpass.quality import logits_kl, top1_agreement

EVAL_TAIL = 1024


def corpus_ids(model: nn.Module, length: int, count: int, offset: int) -> torch.Tensor:
    """[count, length] token ids of corpus text (random ids for a model without a local tokenizer)."""
    from optpass.adapters import tokenizer_for
    from optpass.corpus import token_windows

    tokenizer = tokenizer_for(model)
    if tokenizer is not None:
        return token_windows(tokenizer, window=length, count=count, offset_windows=offset)
    g = torch.Generator().manual_seed(11 + offset)
    return torch.randint(0, model.config.vocab_size, (count, length), generator=g)


@torch.no_grad()
def tail_quality(model: nn.Module, windows: torch.Tensor, reference: list[torch.Tensor]) -> dict[str, float]:
    """Perplexity change, KL and top-1 agreement of the last EVAL_TAIL positions vs the dense `reference` logits."""
    kls, top1s, ref_nll, new_nll = [], [], [], []
    for ids, ref in zip(windows.split(1), reference):
        tail = ref.shape[1]
        new = model(input_ids=ids, use_cache=False, logits_to_keep=tail + 1).logits[:, :-1].float()
        target = ids[:, -tail:]
        kls.append(logits_kl(ref, new))
        top1s.append(top1_agreement(ref, new))
        ref_nll.append(nn.functional.cross_entropy(ref[0], target[0]))
        new_nll.append(nn.functional.cross_entropy(new[0], target[0]))
    ppl_ref, ppl_new = float(torch.stack(ref_nll).mean().exp()), float(torch.stack(new_nll).mean().exp())
    return {"kl": sum(kls) / len(kls), "top1": sum(top1s) / len(top1s), "perplexity": ppl_new,
            "ppl_increase": ppl_new / ppl_ref - 1}


@torch.no_grad()
def reference_logits(model: nn.Module, windows: torch.Tensor, tail: int) -> list[torch.Tensor]:
    """Per window, the model's logits [1, tail, V] predicting its last `tail` tokens (before any rewrite)."""
    return [model(input_ids=w, use_cache=False, logits_to_keep=tail + 1).logits[:, :-1].float()
            for w in windows.split(1)]
