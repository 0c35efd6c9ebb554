"""Block layouts: which key blocks each query block attends, the one format every sparse pattern produces.

A layout is a bool tensor `keep [B, H, nQ, nK]` over blocks of `block` tokens (B and H may be 1 and broadcast).
Token-level rules are the same for every pattern and applied by the lowering, not the pattern: causality
(`key <= query`), key padding (`key_valid [B, S]`) and the ragged last block. `kv_blocks` converts a layout to
FlexAttention's / the Triton kernel's convention (per query block, a count and a list of key-block indices),
split into *full* blocks (no token rule can mask anything in them: the kernel skips the mask) and *partial*
ones (the diagonal, blocks that hold padding, the ragged tail).
"""

from __future__ import annotations

import torch
from torch import Tensor


def num_blocks(length: int, block: int) -> int:
    return -(-length // block)


def causal_blocks(n: int, device: torch.device | None = None) -> Tensor:
    """[n, n] bool: key block <= query block."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def clip_causal(keep: Tensor) -> Tensor:
    """The layout with blocks above the diagonal dropped and the diagonal always kept (every query sees itself,
    so no row is empty)."""
    n_q, n_k = keep.shape[-2:]
    eye = torch.eye(n_q, n_k, dtype=torch.bool, device=keep.device)
    return (keep & causal_blocks(n_q, keep.device)[:, :n_k]) | eye


def density(keep: Tensor, causal: bool = True) -> Tensor:
    """Per head [H], the share of the (causal) blocks kept, averaged over the batch."""
    n_q, n_k = keep.shape[-2:]
    total = causal_blocks(n_q, keep.device)[:, :n_k].sum() if causal else torch.tensor(n_q * n_k)
    return keep.flatten(-2).sum(-1).float().mean(0) / total


def as_indices(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Count and indices (listed first, stable order) of the True entries of each row of `mask [B, H, nQ, nK]`."""
    count = mask.sum(-1, dtype=torch.int32)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return count.contiguous(), order.contiguous()


def kv_blocks(keep: Tensor, q_len: int, block: int, causal: bool = True, key_valid: Tensor | None = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(partial count, partial indices, full count, full indices) of `keep [B, H, nQ, nK]` for queries
    0..q_len-1 attending keys 0..q_len-1. A block is *full* when every (query, key) pair in it is allowed by the
    token rules, so the kernel needs no mask inside it."""
    keep = clip_causal(keep) if causal else keep
    n_q, n_k = keep.shape[-2:]
    q_block = torch.arange(n_q, device=keep.device)[:, None]
    k_block = torch.arange(n_k, device=keep.device)[None, :]
    partial = (q_block == k_block) if causal else torch.zeros(n_q, n_k, dtype=torch.bool, device=keep.device)
    ragged = q_len % block != 0
    if ragged:  # the last key block holds positions past the sequence
        partial = partial | (k_block == n_k - 1)
    partial = partial.expand_as(keep)
    if key_valid is not None:  # blocks holding padding keys need the mask
        pad = torch.nn.functional.pad(~key_valid, (0, n_k * block - key_valid.shape[-1]), value=True)
        has_pad = pad.view(pad.shape[0], n_k, block).any(-1)  # [B, nK]
        partial = partial | has_pad[:, None, None, :]
    return (*as_indices(keep & partial), *as_indices(keep & ~partial))


def dense_mask(keep: Tensor, q_len: int, k_len: int, block: int, causal: bool = True,
               key_valid: Tensor | None = None) -> Tensor:
    """[B, H, q_len, k_len] bool token mask of a layout with the token rules applied: the reference every
    lowering must match (queries are the last q_len positions of the k_len keys)."""
    rows = keep.repeat_interleave(block, -2)[..., :q_len, :]
    mask = rows.repeat_interleave(block, -1)[..., :k_len]
    if causal:
        offset = k_len - q_len
        mask = mask & torch.ones(q_len, k_len, dtype=torch.bool, device=keep.device).tril(offset)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    return mask
