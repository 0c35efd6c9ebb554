"""Triton kernel for int8 weight-only linear: y[M, N] = (x[M, K] @ q[N, K].T) * scale[N] (+ bias[N]).

The weight stays int8 in global memory; each [BLOCK_K, BLOCK_N] tile is loaded as int8 and converted
to x's dtype in registers (exact: |q| <= 127 fits fp16/bf16/fp32), fed to `tl.dot` with an fp32
accumulator, and the per-output-channel scale (and bias) is applied once to the accumulator tile.
M, N and K tails are handled with masks, so any shape works.  This module imports triton
unconditionally; `optpass.backends.triton.ops` guards the import.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_wo_linear_kernel(
    x_ptr, q_ptr, scale_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N

    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # weight tile viewed as [BLOCK_K, BLOCK_N] (q is [N, K], so this is q.T)
    q_ptrs = q_ptr + offs_k[:, None] * stride_qk + offs_n[None, :] * stride_qn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(q_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0)
        w = w.to(x.dtype)  # int8 -> compute dtype, in registers
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        q_ptrs += BLOCK_K * stride_qk

    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's TF32 setting for matmuls (IEEE by default); 16-bit inputs use the default."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def block_sizes(m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) by batch size: narrow N tiles for decode-sized M to fill the SMs."""
    if m <= 16:
        return 16, 32, 128, 4
    if m <= 32:
        return 32, 64, 64, 4
    return 64, 64, 64, 4


def int8_weight_only_matmul(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """x [M, K] (fp32/fp16/bf16), q int8 [N, K], scale [N], bias [N] or None -> y [M, N] in x.dtype."""
    if x.dim() != 2 or q.dim() != 2 or x.shape[1] != q.shape[1]:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, q {tuple(q.shape)}")
    if q.dtype != torch.int8:
        raise TypeError(f"q must be int8, got {q.dtype}")
    m, k = x.shape
    n = q.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.copy_(bias.expand(m, n)) if bias is not None else y.zero_()
    scale = scale.contiguous()
    bias_arg = bias.contiguous() if bias is not None else scale  # dummy pointer when HAS_BIAS is False
    block_m, block_n, block_k, num_warps = block_sizes(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int8_wo_linear_kernel[grid](
        x, q, scale, bias_arg, y,
        m, n, k,
        x.stride(0), x.stride(1), q.stride(0), q.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None,
        DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return y
