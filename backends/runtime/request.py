"""Reading a `generate()` call the way transformers does: the model's `generation_config`, overridden by a
`generation_config=` argument, overridden by keyword arguments. The fast path honours a known set of options;
anything else set away from its default is named, and the call goes to transformers' own loop.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# GenerationConfig fields the runtime implements (others must keep their defaults for the fast path)
SUPPORTED_FIELDS = {
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k", "top_p",
    "min_p", "repetition_penalty", "eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id",
    "num_return_sequences", "stop_strings", "use_cache", "transformers_version", "cache_implementation",
    "_from_model_config", "return_legacy_cache", "renormalize_logits",
}
# output flags whose falsy values (False, or None as transformers 5 defaults them) change nothing
OFF_WHEN_FALSY = {"output_attentions", "output_hidden_states", "output_scores", "output_logits",
                  "return_dict_in_generate"}
# keyword arguments of generate() that are not generation-config fields but the fast path understands
CALL_ARGUMENTS = {"input_ids", "inputs", "attention_mask", "generation_config", "tokenizer"}


@dataclass
class Request:
    input_ids: torch.Tensor  # [B, S], rows expanded num_return_sequences times
    attention_mask: torch.Tensor | None  # [B, S] or None (no padding)
    config: Any  # the merged GenerationConfig
    new_tokens: int
    eos: list[int]
    pad: int | None
    tokenizer: Any = None


def parse(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[Request | None, str]:
    """(request, "") if the fast path can honour this call exactly, else (None, the reason it cannot)."""
    extra = sorted(set(kwargs) - CALL_ARGUMENTS)
    base = kwargs.get("generation_config") or model.generation_config
    config = copy.deepcopy(base)
    unused = config.update(**{k: kwargs[k] for k in extra})
    if unused:
        return None, f"generate() arguments {sorted(unused)} are not implemented by optpass's decode runtime"
    if len(args) > 1:
        return None, "positional generate() arguments beyond the input ids"
    ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs"))
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
        return None, "inputs are not a [batch, seq] tensor of token ids"
    diff = {k for k, v in config.to_diff_dict().items()
            if k not in SUPPORTED_FIELDS and not (k in OFF_WHEN_FALSY and not v)}
    if diff:
        return None, f"generation options {sorted(diff)} are not implemented by optpass's decode runtime"
    if config.stop_strings and kwargs.get("tokenizer") is None:
        return None, "stop_strings need the tokenizer= argument"
    if config.renormalize_logits:
        return None, "renormalize_logits"
    mask = kwargs.get("attention_mask")
    if mask is not None and bool(mask.all()):
        mask = None
    if mask is not None and bool((mask[:, -1] == 0).any()):
        return None, "right padding (the runtime takes left-padded batches)"
    prompt = ids.shape[1]
    new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt
    if new is None or new < 1:
        return None, "no new tokens requested"
    n = config.num_return_sequences or 1
    if n > 1:
        if not config.do_sample:
            return None, "num_return_sequences > 1 without sampling (beam search)"
        ids = ids.repeat_interleave(n, dim=0)
        mask = mask.repeat_interleave(n, dim=0) if mask is not None else None
    eos = config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
    return Request(ids, mask, config, int(new), eos, pad, kwargs.get("tokenizer")), ""
