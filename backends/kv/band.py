"""The attention mask of a full-attention layer made local (`linear_attention` pass): the model's own mask
restricted to each row's first `sink` real keys plus the trailing `window` keys of every query.

transformers builds one full causal mask for a Llama's layers, so a layer optpass made local narrows it here, on
every attention call that does not go through optpass's ring cache (prefills, Hugging Face's own decode loop
with its dynamic or static cache). The ring (`backends/kv/ring.py`) keeps exactly these keys at decode, so both
paths compute the same function. Query positions come from the mask itself (a causal query row's last visible
key is the query), so a static cache's unused tail and left padding need no extra arguments.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from optpass.hf_compat import local_layers


def local_window(module: nn.Module) -> tuple[int, int] | None:
    """(sink, window) when this attention module's layer was made local, else None."""
    config, idx = getattr(module, "config", None), getattr(module, "layer_idx", None)
    if config is None or idx is None:
        return None
    return local_layers(config).get(idx)


def banded(mask: Any, q_len: int, k_len: int, sink: int, window: int, device: torch.device) -> Tensor:
    """`mask` (None = causal, bool allowed, or additive float [B, 1, Q, K]) limited to sinks + window, in the
    same convention (None becomes a bool mask)."""
    if mask is None:
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)[None, None]
    elif isinstance(mask, Tensor) and mask.dim() == 4:
        allowed = mask if mask.dtype == torch.bool else mask == 0
    else:
        raise TypeError(f"optpass local attention: cannot narrow a {type(mask).__name__} attention mask")
    keys = allowed.shape[-1]
    valid = allowed[:, :, -1:, :]  # [B, 1, 1, K]: the last query sees every real key up to itself
    sinks = valid & (valid.cumsum(-1) <= sink)
    last = (keys - 1 - valid.flip(-1).int().argmax(-1)).flatten().tolist()  # per row: the last query's position

    def recent(last_query: int) -> Tensor:
        """[Q, K]: key j is within the window of query i (position last_query - (Q - 1) + i)."""
        first_query = last_query - (q_len - 1)
        return torch.ones(q_len, keys, dtype=torch.bool, device=device).triu(first_query - window + 1)

    window_rows = recent(last[0])[None, None] if len(set(last)) == 1 else torch.stack([recent(p) for p in last])[:, None]
    narrowed = allowed & (sinks | window_rows)
    if mask is None or mask.dtype == torch.bool:
        return narrowed
    return torch.where(narrowed, 0.0, torch.finfo(mask.dtype).min).to(mask.dtype)
