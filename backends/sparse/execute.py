"""The one lowering of a block layout: block-sparse attention that visits only the kept key blocks.

CPU: PyTorch FlexAttention compiled by Inductor (its CPU template iterates over each query block's listed key
blocks, so the work is proportional to the kept blocks, not a masked dense computation); the block mask is built
straight from the layout (`BlockMask.from_kv_blocks`), never by evaluating a mask function over S x S. CUDA: the
Triton block-sparse flash-attention op (`torch.ops.optpass.block_sparse_attention`). Shapes: query [B, H, S, D],
key / value [B, Hk, S, D] (grouped-query heads), keep [B or 1, H, nQ, nK]; returns [B, H, S, D].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from optpass.backends.sparse.layout import as_indices, clip_causal, kv_blocks

_compiled: Callable | None = None


def _flex() -> Callable:
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        # dynamic: one compiled kernel serves every prompt length (no recompilation per length)
        _compiled = torch.compile(flex_attention, dynamic=True)
    return _compiled


def _causal(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
    return q >= k


def _everything(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
    return q >= 0  # non-causal: FlexAttention itself drops keys past the sequence in the ragged last block


def block_sparse_attention(query: Tensor, key: Tensor, value: Tensor, keep: Tensor, block: int, scale: float,
                           causal: bool = True) -> Tensor:
    """Attention of `query` over the kept key blocks (causal if `causal`). Key padding is the caller's: run
    each padded row on its own unpadded slice (`attend.sparse_prefill` does), since a mask function that reads
    a per-call tensor makes Inductor's CPU template recompile per call (and, with dynamic shapes, fail to
    build in torch 2.13)."""
    batch, heads, seq, _ = query.shape
    keep = keep.expand(batch, heads, *keep.shape[-2:])
    if query.is_cuda:
        from optpass.backends.triton import sparse_ops

        count, indices = as_indices(clip_causal(keep) if causal else keep)
        return sparse_ops.block_sparse_attention(query, key, value, count, indices, block, scale, causal, None)
    from torch.nn.attention.flex_attention import BlockMask

    partial_n, partial_i, full_n, full_i = kv_blocks(keep, seq, block, causal)
    mask_mod = _causal if causal else _everything
    mask = BlockMask.from_kv_blocks(partial_n, partial_i, full_n, full_i, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(seq, seq))
    return _flex()(query, key, value, block_mask=mask, scale=scale, enable_gqa=key.shape[1] != heads)
