"""`optpass::decode_attention`: attention of a few query rows (a decode step, a verify step's k + 1 rows) over a
static KV cache, for CPU decode (`csrc/decode_attention.cpp`).

transformers' SDPA path, inside a compiled step with a mask and grouped-query heads, copies K and V once per
query head (`repeat_kv`) every layer and every step, and attends over every slot of the static cache; at 1-2k
tokens of context that doubles a SmolLM2 decode step. The kernel reads each valid key / value row once per KV
head and skips the slots the mask hides. Each query row is computed by the same loops whatever the number of
rows, so a verify step's rows equal one-token steps bit for bit (lossless greedy speculative decoding).

`attend` returns None where the kernel does not apply (no kernels built, not float32, a mask that is not
boolean, more than `MAX_QUERY_ROWS` rows: a prefill); the caller then uses its own implementation.
"""

from __future__ import annotations

import torch

MAX_QUERY_ROWS = 16


def register_fake() -> None:
    @torch.library.register_fake("optpass::decode_attention")
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
          softcap: float) -> torch.Tensor:
        return q.new_empty((q.shape[0], q.shape[2], q.shape[1], q.shape[3]))


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float,
           softcap: float | None = None) -> torch.Tensor | None:
    """[B, Q, Hq, D] attention output, or None where the kernel does not apply."""
    from optpass.backends.cpu import gemv_ops

    if query.shape[2] > MAX_QUERY_ROWS or query.device.type != "cpu" or not isinstance(mask, torch.Tensor) \
            or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-1] != key.shape[2] \
            or not all(t.dtype == torch.float32 for t in (query, key, value)) \
            or key.stride(-1) != 1 or value.stride(-1) != 1 or not gemv_ops.available():
        return None
    mask = mask.expand(query.shape[0], mask.shape[1], query.shape[2], key.shape[2])
    return torch.ops.optpass.decode_attention(query, key, value, mask, float(scale), float(softcap or 0.0))
