"""Triton block-sparse flash-attention forward kernel (block-sparse FlashAttention, Dao et al. 2022).

    out = block_sparse_attention_triton(q, k, v, kv_num_blocks, kv_indices, block, scale, causal, key_valid)
        q [B, H, S, D];  k, v [B, Hk, Sk, D], H % Hk == 0 (query head h reads kv head h // (H // Hk)), Sk >= S
        kv_num_blocks int32 [B, H, nQ], nQ = ceil(S / block);  kv_indices int32 [B, H, nQ, maxK]
        key_valid None or bool [B, Sk] (False = padding key)
        out [B, H, S, D] in q.dtype

The layout is FlexAttention's BlockMask convention: query block qb of (b, h) attends the key blocks
kv_indices[b, h, qb, :kv_num_blocks[b, h, qb]].  One program handles one (query block, b * h); it
loops over that row's listed key blocks only (work is proportional to the kept blocks), loads the
[block, D] K / V tiles with masks for the ragged tail (and for D padded to a power of two), masks
keys that are padding or (if causal) in the future -- queries are the last S of the Sk positions --
and accumulates an online softmax in fp32.  A query row that attends no key gives zeros.  Listed
indices outside [0, ceil(Sk / block)) contribute nothing.  This module imports triton
unconditionally; `optpass.backends.triton.sparse_ops` guards the import.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .int8_matmul import dot_precision

_LOG2E = 1.4426950408889634


@triton.jit
def _block_sparse_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, num_ptr, idx_ptr, valid_ptr,
    H, GROUP, S, SK, D, qk_scale,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_nb, stride_nh, stride_nq,
    stride_ib, stride_ih, stride_iq, stride_ik,
    stride_valid_b, stride_valid_s,
    CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP

    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < S
    mask_d = offs_d < D

    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh

    m_i = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK,), dtype=tl.float32)
    acc = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)

    n_blocks = tl.load(num_ptr + b * stride_nb + h * stride_nh + qb * stride_nq)
    idx_row = idx_ptr + b * stride_ib + h * stride_ih + qb * stride_iq
    for j in range(0, n_blocks):
        kb = tl.load(idx_row + j * stride_ik)
        offs_n = kb * BLOCK + tl.arange(0, BLOCK)
        mask_n = (offs_n >= 0) & (offs_n < SK)
        # K tile viewed as [BLOCK_D, BLOCK] (k^T), V tile as [BLOCK, BLOCK_D]
        kt = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                     mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # log2 domain

        keep = mask_n
        if HAS_VALID:
            valid = tl.load(valid_ptr + b * stride_valid_b + offs_n * stride_valid_s, mask=mask_n, other=0)
            keep = keep & (valid != 0)
        keep2 = tl.broadcast_to(keep[None, :], (BLOCK, BLOCK))
        if CAUSAL:
            keep2 = keep2 & (offs_n[None, :] <= offs_m[:, None] + (SK - S))
        s = tl.where(keep2, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: exp2(-inf) = 0
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)

        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # acc is 0 where l_i is 0
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def supports_block(block: int) -> bool:
    """Block sizes the kernel is built for: a power of two in [16, 128] (tl.dot needs tiles >= 16)."""
    return 16 <= block <= 128 and (block & (block - 1)) == 0


def block_sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    block: int,
    scale: float,
    causal: bool,
    key_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Launch the kernel; shapes as in the module docstring (size-1 batch / head dims of the layout broadcast)."""
    if not supports_block(block):
        raise ValueError(f"block must be a power of two in [16, 128], got {block}")
    bsz, h, s, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    if h % hk != 0 or sk < s or k.shape != v.shape or k.shape[0] != bsz or k.shape[3] != d:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    n_q = triton.cdiv(s, block)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    kv_num_blocks = kv_num_blocks.expand(bsz, h, n_q)
    kv_indices = kv_indices.expand(bsz, h, n_q, kv_indices.shape[-1])
    if key_valid is not None:
        valid_arg = key_valid.view(torch.uint8) if key_valid.dtype == torch.bool else key_valid
        stride_valid = (valid_arg.stride(0), valid_arg.stride(1))
    else:
        valid_arg, stride_valid = kv_num_blocks, (0, 0)  # dummy pointer when HAS_VALID is False
    block_d = max(16, triton.next_power_of_2(d))
    grid = (n_q, bsz * h)
    _block_sparse_attn_fwd_kernel[grid](
        q, k, v, out, kv_num_blocks, kv_indices, valid_arg,
        h, h // hk, s, sk, d, scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *kv_num_blocks.stride(), *kv_indices.stride(), *stride_valid,
        CAUSAL=causal, HAS_VALID=key_valid is not None, DOT_PRECISION=dot_precision(q.dtype),
        BLOCK=block, BLOCK_D=block_d,
        num_warps=4 if block_d <= 64 else 8,
    )
    return out
