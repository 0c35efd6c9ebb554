"""How local a layer's attention is: the share of each head's exact attention mass that falls on the first
`sink` tokens plus the trailing `window` (LightTransfer's "lazy layer" measure, StreamingLLM's pattern), read on
query rows far enough in that the window actually drops keys."""

from __future__ import annotations

import torch
from torch import Tensor

ROWS = 64  # query positions sampled per layer, evenly spread past sink + window


@torch.no_grad()
def local_mass(query: Tensor, key: Tensor, scale: float, sink: int, window: int, rows: int = ROWS) -> Tensor:
    """[H] per query head, the mean attention mass on sinks + window (1.0 when the text is not longer than
    sink + window). `query` [1, H, S, D], `key` [1, Hk, S, D] after RoPE, as `capture_queries_keys` records."""
    heads, seq = query.shape[1], query.shape[2]
    if seq <= sink + window:
        return torch.ones(heads)
    pos = torch.linspace(sink + window, seq - 1, rows).round().long().unique()
    keys = key[0].float().repeat_interleave(heads // key.shape[1], 0)  # [H, S, D]
    logits = query[0, :, pos].float() @ keys.transpose(-1, -2) * scale  # [H, R, S]
    j = torch.arange(seq)
    logits.masked_fill_(j[None, :] > pos[:, None], float("-inf"))
    probs = logits.softmax(-1)
    kept = (j[None, :] < sink) | (pos[:, None] - j[None, :] < window)  # [R, S]
    return (probs * kept).sum(-1).mean(-1)
