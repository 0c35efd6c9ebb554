"""`torch.library` custom op for block-sparse attention (block-sparse FlashAttention), backed by a Triton kernel.

    torch.ops.optpass.block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, block, scale, causal, key_valid)
        q [B, H, S, D];  k, v [B, Hk, Sk, D] with H % Hk == 0 (query head h reads kv head h // (H // Hk)), Sk >= S
        kv_num_blocks int32 [B, H, nQ], nQ = ceil(S / block);  kv_indices int32 [B, H, nQ, maxK]
        key_valid None or bool [B, Sk] (False = padding key, never attended)
        out [B, H, S, D] in q.dtype = softmax(scale * q k^T over the attended keys) v

Query i of query block i // block attends key j iff j // block is among kv_indices[b, h, qb, :kv_num_blocks[b, h, qb]]
(FlexAttention's BlockMask convention; entries past the count are ignored, listed indices outside
[0, ceil(Sk / block)) contribute nothing), j < Sk, key_valid[b, j] if given, and, if causal,
j <= i + (Sk - S) (queries are the last S positions).  A row that attends no key gives zeros.  Layout
tensors with batch / head size 1 broadcast.

The op is a single opaque node for torch.export / torch.compile (a fake impl gives the output).  The
real impl runs the Triton kernel when triton is importable, q is fp32/fp16/bf16, block is a power of
two in [16, 128] and either q is on CUDA or the kernel was built by the Triton interpreter
(TRITON_INTERPRET=1 set before triton was imported; then CPU tensors work too).  Otherwise -- no
triton, CPU tensors without the interpreter, other dtypes or block sizes, bf16 under the interpreter
(its tl.dot does not support bf16, triton-lang/triton#11584) -- it falls back to
`reference_block_sparse_attention`: a dense [B, H, S, Sk] mask and a masked softmax in fp32 (memory
O(S * Sk); the optpass CPU path runs the same layout through FlexAttention instead).  No autograd.
Importing this module never requires triton.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

try:
    from .block_sparse_attention import _block_sparse_attn_fwd_kernel, block_sparse_attention_triton, supports_block

    HAVE_TRITON = True
    # triton.jit decides interpreter vs compiled at decoration time, i.e. when this module was imported.
    INTERPRET = type(_block_sparse_attn_fwd_kernel).__name__ == "InterpretedFunction"
except Exception:  # ImportError, or a broken triton install: keep the reference path
    HAVE_TRITON = False
    INTERPRET = False

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def uses_triton(q: Tensor, block: int) -> bool:
    """Whether the op dispatches `q` with this `block` size to the Triton kernel."""
    if not HAVE_TRITON or q.dtype not in _KERNEL_DTYPES or not (q.is_cuda or INTERPRET):
        return False
    if INTERPRET and q.dtype == torch.bfloat16:  # the interpreter's tl.dot multiplies bf16 bit patterns
        return False
    return supports_block(block)


def layout_to_dense_mask(
    kv_num_blocks: Tensor,
    kv_indices: Tensor,
    block: int,
    s: int,
    sk: int,
    causal: bool,
    key_valid: Optional[Tensor] = None,
) -> Tensor:
    """bool [B, H, S, Sk]: True where query i attends key j under the op's layout semantics."""
    n_k = -(-sk // block)
    idx = kv_indices.long()
    listed = torch.arange(idx.shape[-1], device=idx.device) < kv_num_blocks.long()[..., None]
    listed &= (idx >= 0) & (idx < n_k)
    idx = torch.where(listed, idx, n_k)  # unlisted / out-of-range entries go to a dropped extra column
    blocks = torch.zeros((*idx.shape[:-1], n_k + 1), dtype=torch.bool, device=idx.device)
    blocks = blocks.scatter(-1, idx, True)[..., :n_k]  # [B, H, nQ, nK]
    mask = blocks.repeat_interleave(block, dim=-2)[..., :s, :].repeat_interleave(block, dim=-1)[..., :sk]
    if causal:
        rows = torch.arange(s, device=idx.device)[:, None] + (sk - s)
        mask = mask & (torch.arange(sk, device=idx.device)[None, :] <= rows)
    if key_valid is not None:
        mask = mask & key_valid.bool()[:, None, None, :]
    return mask


def reference_block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_num_blocks: Tensor,
    kv_indices: Tensor,
    block: int,
    scale: float,
    causal: bool,
    key_valid: Optional[Tensor] = None,
) -> Tensor:
    """Pure-torch op semantics: dense mask from the layout, masked softmax in fp32, zeros for rows with no key."""
    group = q.shape[1] // k.shape[1]
    mask = layout_to_dense_mask(kv_num_blocks, kv_indices, block, q.shape[2], k.shape[2], causal, key_valid)
    mask = mask.expand(q.shape[0], q.shape[1], -1, -1)
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = (q.float() @ kf.transpose(-1, -2)) * scale
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).masked_fill(~mask, 0.0)  # NaN rows -> 0
    return (p @ vf).to(q.dtype)


def _check_args(q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor, block: int,
                key_valid: Optional[Tensor]) -> None:
    torch._check(q.dim() == 4 and k.dim() == 4 and v.shape == k.shape, lambda: "q [B, H, S, D], k = v [B, Hk, Sk, D]")
    torch._check(k.shape[0] == q.shape[0] and k.shape[3] == q.shape[3], lambda: "q and k/v differ in B or D")
    torch._check(q.shape[1] % k.shape[1] == 0, lambda: "H must be a multiple of Hk")
    torch._check(k.shape[2] >= q.shape[2], lambda: "Sk must be >= S")
    torch._check(q.dtype == k.dtype == v.dtype, lambda: "q, k, v must share a dtype")
    torch._check(block > 0, lambda: "block must be positive")
    n_q = -(-q.shape[2] // block)
    torch._check(kv_num_blocks.dim() == 3 and kv_num_blocks.shape[2] == n_q, lambda: "kv_num_blocks [B, H, nQ]")
    torch._check(kv_indices.dim() == 4 and kv_indices.shape[2] == n_q, lambda: "kv_indices [B, H, nQ, maxK]")
    torch._check(key_valid is None or key_valid.shape == (q.shape[0], k.shape[2]), lambda: "key_valid [B, Sk]")


@torch.library.custom_op("optpass::block_sparse_attention", mutates_args=())
def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_num_blocks: Tensor,
    kv_indices: Tensor,
    block: int,
    scale: float,
    causal: bool,
    key_valid: Optional[Tensor] = None,
) -> Tensor:
    """softmax(scale * q k^T over the keys the block layout (and causal / key_valid) allows) v, in q.dtype."""
    _check_args(q, k, v, kv_num_blocks, kv_indices, block, key_valid)
    if not uses_triton(q, block):
        return reference_block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, block, scale, causal, key_valid)
    return block_sparse_attention_triton(q, k, v, kv_num_blocks, kv_indices, block, scale, causal, key_valid)


@block_sparse_attention.register_fake
def _block_sparse_attention_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_num_blocks: Tensor,
    kv_indices: Tensor,
    block: int,
    scale: float,
    causal: bool,
    key_valid: Optional[Tensor] = None,
) -> Tensor:
    _check_args(q, k, v, kv_num_blocks, kv_indices, block, key_valid)
    return torch.empty_like(q, memory_format=torch.contiguous_format)
