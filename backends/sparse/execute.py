"""The one lowering of a block layout: block-sparse attention that visits only the kept key blocks.

CPU with AVX-512 BF16: `optpass::prefill_attention` (`backends/cpu/prefill_attention.py`), which visits each
query block's listed key blocks with bf16 dot products and fp32 sums (bf16 SDPA's numerics; the pass measures
the quality of exactly this lowering). Other CPUs: PyTorch FlexAttention compiled by Inductor (its CPU template
also iterates over the listed key blocks only, at ~0.5-0.6x fp32 SDPA's speed per kept block on the 2-core Zen 4
VM); the block mask is built straight from the layout (`BlockMask.from_kv_blocks`), never by evaluating a mask
function over S x S. CUDA: the
Triton block-sparse flash-attention op (`torch.ops.optpass.block_sparse_attention`). Shapes: query [B, H, S, D],
key / value [B, Hk, S, D] (grouped-query heads), keep [B or 1, H, nQ, nK]; returns [B, H, S, D].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from optpass.backends.cpu import prefill_attention
from optpass.backends.own_code import own_code
from optpass.backends.sparse.layout import as_indices, clip_causal, kv_blocks

_compiled: dict[tuple, Callable] = {}


def _flex(key: tuple) -> Callable:
    """A compiled FlexAttention per (causal, block, scale, grouped-query) key, each its own code object (dynamic
    shapes: one kernel for every length). Dynamo specialises on the mask function, the block size and the float
    scale, and counts recompiles per code object, so keys do not use up each other's recompiles."""
    if key not in _compiled:
        from torch.nn.attention.flex_attention import flex_attention

        def attend(*args: Any, **kwargs: Any) -> Tensor:
            return flex_attention(*args, **kwargs)
        # fullgraph: past the recompile limit Dynamo raises instead of running FlexAttention eagerly, which
        # ignores the block lists and attends to every key its mask function allows (all keys here: silently dense)
        _compiled[key] = torch.compile(own_code(attend, "optpass_flex"), dynamic=True, fullgraph=True)
    return _compiled[key]


def _flex_call(key: tuple, *args: Any, **kwargs: Any) -> Tensor:
    """The compiled call; a key whose function reached Dynamo's recompile limit gets a fresh one (compiled anew)."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    try:
        return _flex(key)(*args, **kwargs)
    except FailOnRecompileLimitHit:
        del _compiled[key]
        return _flex(key)(*args, **kwargs)


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
    if query.is_cuda or prefill_attention.applies(query, key, value, block):  # both take index lists
        count, indices = as_indices(clip_causal(keep) if causal else keep)
        if query.is_cuda:
            from optpass.backends.triton import sparse_ops

            return sparse_ops.block_sparse_attention(query, key, value, count, indices, block, scale, causal, None)
        return prefill_attention.attend(query, key, value, scale, causal, (count, indices), block).transpose(1, 2)
    from torch.nn.attention.flex_attention import BlockMask

    partial_n, partial_i, full_n, full_i = kv_blocks(keep, seq, block, causal)
    mask_mod = _causal if causal else _everything
    mask = BlockMask.from_kv_blocks(partial_n, partial_i, full_n, full_i, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(seq, seq))
    gqa = key.shape[1] != heads
    return _flex_call((causal, block, float(scale), gqa), query, key, value, block_mask=mask, scale=scale,
                      enable_gqa=gqa)
