"""Triton kernel for int4 group-wise weight-only linear.

    y[M, N] = sum_g (x[:, g] @ (q[:, g] - zero[:, g]).T) * scale[:, g]   (+ bias[N])

with the canonical format of `optpass.backends.quant_format`: packed uint8 [N, K/2] (even k in the
low nibble, odd k in the high nibble), scale fp32 [N, K/group_size], zero fp32 (or uint8) [N, K/group_size].

The kernel walks K one quantization group at a time (BLOCK_K == group_size, so K has no tail):
it loads the [group_size/2, BLOCK_N] packed bytes, splits them into the even-k (low nibble) and
odd-k (high nibble) halves in registers, subtracts the group's zero point (exact small integers in
x's dtype), and multiplies them against the even / odd columns of the x tile with `tl.dot`.  The
group's scale is applied to that [BLOCK_M, BLOCK_N] partial product before it is added to the fp32
accumulator -- mathematically (q - zero) * scale dotted with x, but the scale multiply is done on
the output tile rather than on every weight element.  No dequantized weight is written to memory.
group_size must be a power of two >= 32 (covers 32/64/128) and divide K; M and N tails are masked.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .int8_matmul import block_sizes, dot_precision


@triton.jit
def _int4_wo_linear_kernel(
    x_ptr, p_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_pn, stride_pk, stride_sn, stride_sg, stride_zn, stride_zg,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    HALF: tl.constexpr = GROUP_SIZE // 2
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, HALF)  # byte index inside the group; covers k = 2j (low) and 2j + 1 (high)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_x = mask_m[:, None]
    mask_w = mask_n[None, :]

    x_even_ptrs = x_ptr + offs_m[:, None] * stride_xm + (2 * offs_j)[None, :] * stride_xk
    x_odd_ptrs = x_even_ptrs + stride_xk
    p_ptrs = p_ptr + offs_j[:, None] * stride_pk + offs_n[None, :] * stride_pn  # [HALF, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // GROUP_SIZE):
        x_even = tl.load(x_even_ptrs, mask=mask_x, other=0.0)
        x_odd = tl.load(x_odd_ptrs, mask=mask_x, other=0.0)
        packed = tl.load(p_ptrs, mask=mask_w, other=0)
        zero = tl.load(zero_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0)
        scale = tl.load(scale_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0)
        z = zero.to(x_even.dtype)[None, :]
        w_even = (packed & 0x0F).to(x_even.dtype) - z  # integers in [-15, 15]: exact in fp16/bf16/fp32
        w_odd = (packed >> 4).to(x_even.dtype) - z
        part = tl.dot(x_even, w_even, input_precision=DOT_PRECISION)
        part = tl.dot(x_odd, w_odd, part, input_precision=DOT_PRECISION)
        acc += part * scale.to(tl.float32)[None, :]
        x_even_ptrs += GROUP_SIZE * stride_xk
        x_odd_ptrs += GROUP_SIZE * stride_xk
        p_ptrs += HALF * stride_pk

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def supports_group_size(group_size: int) -> bool:
    """Power of two >= 32 (tl.dot needs an inner dimension of at least 16 per nibble half), at most 1024."""
    return 32 <= group_size <= 1024 and group_size & (group_size - 1) == 0


def int4_weight_only_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x [M, K], packed uint8 [N, K/2], scale [N, K/gs], zero fp32 [N, K/gs], bias [N] or None -> y [M, N]."""
    m, k = x.shape
    n = packed.shape[0]
    if not supports_group_size(group_size):
        raise ValueError(f"group_size {group_size} unsupported by the Triton int4 kernel")
    if k % group_size or packed.shape[1] * 2 != k:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, packed {tuple(packed.shape)}, group {group_size}")
    if tuple(scale.shape) != (n, k // group_size) or tuple(zero.shape) != (n, k // group_size):
        raise ValueError(f"scale/zero must be [{n}, {k // group_size}], got {tuple(scale.shape)}/{tuple(zero.shape)}")
    if packed.dtype != torch.uint8 or zero.dtype not in (torch.uint8, torch.float32):
        raise TypeError("packed must be uint8 and zero float32 (or uint8)")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    bias_arg = bias.contiguous() if bias is not None else scale  # dummy pointer when HAS_BIAS is False
    block_m, block_n, _, num_warps = block_sizes(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_wo_linear_kernel[grid](
        x, packed, scale, zero, bias_arg, y,
        m, n, k,
        x.stride(0), x.stride(1), packed.stride(0), packed.stride(1),
        scale.stride(0), scale.stride(1), zero.stride(0), zero.stride(1),
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None,
        DOT_PRECISION=dot_precision(x.dtype),
        GROUP_SIZE=group_size,
        BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y
