"""When a model's attention call may run block-sparse, and the call itself.

Sparse attention replaces a *prefill from an empty cache* only: queries 0..S-1 over keys 0..S-1 (a static
cache's unused tail is masked and sliced off), causal with at most left padding (each padded row runs on its own unpadded slice, so its layout, sinks included,
starts at its first real token and it gives what it gives alone). Anything else (decode steps,
verify steps, a prefill continuing a cache, a custom mask, softcapped logits, training) returns None and the
model's own attention runs. The mask check reads every 64th query row, so a packed-sequence or otherwise
non-causal mask is recognised without an S x S comparison.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from optpass.backends.sparse.execute import block_sparse_attention
from optpass.backends.sparse.plan import LayerSparsity

ATTRIBUTE = "optpass_sparse"  # the attention module's LayerSparsity, set by the sparse_attention pass
_MASK_ROW_STRIDE = 64


def layer_plan(module: nn.Module) -> LayerSparsity | None:
    return getattr(module, ATTRIBUTE, None)


def _key_valid(mask: Any, q_len: int, k_len: int) -> tuple[bool, Tensor | None]:
    """(usable, key validity [B, S] or None) from the mask transformers passes the attention function."""
    if mask is None:
        return k_len == q_len, None
    if not isinstance(mask, Tensor) or mask.dim() != 4:
        return False, None
    allowed = mask if mask.dtype == torch.bool else mask == 0
    if k_len > q_len and bool(allowed[..., q_len:].any()):
        return False, None  # keys before this prefill are visible: not a prefill from an empty cache
    allowed = allowed[:, 0, :, :q_len]
    valid = allowed[:, -1]
    rows = torch.arange(0, q_len, _MASK_ROW_STRIDE, device=allowed.device)
    expected = (torch.arange(q_len, device=allowed.device)[None, :] <= rows[:, None])[None] & valid[:, None, :]
    real = valid[:, rows]  # padding query rows may see anything; only real queries must match
    if not bool(((allowed[:, rows] == expected) | ~real[..., None]).all()):
        return False, None
    return True, None if bool(valid.all()) else valid


def prefill_starts(module: nn.Module, mask: Any, q_len: int, k_len: int, kwargs: dict[str, Any]
                   ) -> tuple[bool, Tensor | None]:
    """(usable, each row's first real position [B] or None without padding): usable when the call is a causal
    prefill from an empty cache with at most left padding (holes or right padding: not usable), in eval mode,
    without logit softcapping, attention sinks or a sliding window: what optpass's prefill lowerings replace."""
    if module.training or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None \
            or kwargs.get("sliding_window"):
        return False, None
    usable, valid = _key_valid(mask, q_len, k_len)
    if not usable or valid is None:
        return usable, None
    starts = q_len - valid.sum(-1)
    if not bool((valid == (torch.arange(q_len, device=valid.device)[None, :] >= starts[:, None])).all()):
        return False, None
    return True, starts


def sparse_prefill(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Any, scale: float,
                   kwargs: dict[str, Any]) -> Tensor | None:
    """[B, S, H, D] (transformers' attention output layout) when this call runs sparse, else None."""
    plan = layer_plan(module)
    q_len = query.shape[2]
    if plan is None or q_len < 2 or not plan.applies(q_len):
        return None
    usable, starts = prefill_starts(module, mask, q_len, key.shape[2], kwargs)
    if not usable:
        return None
    key, value = key[:, :, :q_len], value[:, :, :q_len]
    if starts is None:
        out = block_sparse_attention(query, key, value, plan.block_mask(query, key), plan.block, scale)
        return out.transpose(1, 2).contiguous()
    out = query.new_zeros(query.shape)  # padding queries attend nothing (their outputs are never read)
    for row, start in enumerate(starts.tolist()):  # each row's layout (its sinks too) starts at its first token
        q, k, v = (t[row:row + 1, :, start:] for t in (query, key, value))
        out[row:row + 1, :, start:] = block_sparse_attention(q, k, v, plan.block_mask(q, k), plan.block, scale)
    return out.transpose(1, 2).contiguous()
