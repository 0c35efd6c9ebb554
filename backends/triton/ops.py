"""`torch.library` custom ops for weight-only quantized linear layers, backed by Triton kernels.

    torch.ops.optpass.int8_weight_only_linear(x, q, scale, bias) -> y
        x [..., K] fp32/fp16/bf16;  q int8 [N, K];  scale fp32 [N];  bias [N] or None
        y [..., N] in x.dtype,  y = x @ (q * scale[:, None]).T + bias
    torch.ops.optpass.int4_weight_only_linear(x, packed, scale, zero, group_size, bias) -> y
        x [..., K];  packed uint8 [N, K/2] (even k low nibble, odd k high nibble);
        scale fp32 [N, K/group_size];  zero fp32 [N, K/group_size];  bias [N] or None
        y [..., N] in x.dtype,  y = x @ ((q - zero) * scale per group).T + bias

Weights use the canonical format of `optpass.backends.quant_format`.  Each op is a single opaque
node for torch.export / torch.compile (a fake impl gives the output shape).  The real impl runs the
Triton kernel when triton is importable, x is fp32/fp16/bf16 and either x is on CUDA or the kernels
were built by the Triton interpreter (TRITON_INTERPRET=1 set before triton was imported; then CPU
tensors work too).  Otherwise -- no triton, CPU tensors without the interpreter, other dtypes, bf16
under the interpreter (its tl.dot does not support bf16, triton-lang/triton#11584), or an int4
group_size the kernel does not support (not a power of two >= 32) -- it falls back to the reference:
dequantize in fp32 and F.linear in fp32, cast to x.dtype.  The ops have no autograd.
Importing this module never requires triton.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..quant_format import dequantize_int4, dequantize_int8, unpack_int4

try:
    from .int4_matmul import _int4_wo_linear_kernel, int4_weight_only_matmul, supports_group_size
    from .int8_matmul import _int8_wo_linear_kernel, int8_weight_only_matmul

    HAVE_TRITON = True
    # triton.jit decides interpreter vs compiled at decoration time, i.e. when this module was imported.
    INTERPRET = type(_int8_wo_linear_kernel).__name__ == "InterpretedFunction" and type(
        _int4_wo_linear_kernel
    ).__name__ == "InterpretedFunction"
except Exception:  # ImportError, or a broken triton install: keep the reference path
    HAVE_TRITON = False
    INTERPRET = False

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def uses_triton(x: Tensor, group_size: Optional[int] = None) -> bool:
    """Whether the ops dispatch `x` (and, for int4, `group_size`) to the Triton kernel."""
    if not HAVE_TRITON or x.dtype not in _KERNEL_DTYPES or not (x.is_cuda or INTERPRET):
        return False
    if INTERPRET and x.dtype == torch.bfloat16:  # the interpreter's tl.dot multiplies bf16 bit patterns
        return False
    return group_size is None or supports_group_size(group_size)


def reference_int8_linear(x: Tensor, q: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    w = dequantize_int8(q, scale)
    b = bias.float() if bias is not None else None
    return F.linear(x.float(), w.to(x.device), b).to(x.dtype)


def reference_int4_linear(
    x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, bias: Optional[Tensor]
) -> Tensor:
    w = dequantize_int4(unpack_int4(packed), scale, zero, group_size)
    b = bias.float() if bias is not None else None
    return F.linear(x.float(), w.to(x.device), b).to(x.dtype)


@torch.library.custom_op("optpass::int8_weight_only_linear", mutates_args=())
def int8_weight_only_linear(x: Tensor, q: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """y[..., N] = x[..., K] @ (q[N, K] * scale[N, None]).T (+ bias[N]), in x.dtype."""
    if not uses_triton(x):
        return reference_int8_linear(x, q, scale, bias)
    k = x.shape[-1]
    y = int8_weight_only_matmul(x.reshape(-1, k), q, scale, bias)
    return y.reshape(*x.shape[:-1], q.shape[0])


@int8_weight_only_linear.register_fake
def _int8_weight_only_linear_fake(x: Tensor, q: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    torch._check(q.dim() == 2 and x.shape[-1] == q.shape[1], lambda: "x [..., K] needs q [N, K]")
    torch._check(scale.shape == (q.shape[0],), lambda: "scale must be [N]")
    return x.new_empty((*x.shape[:-1], q.shape[0]))


@torch.library.custom_op("optpass::int4_weight_only_linear", mutates_args=())
def int4_weight_only_linear(
    x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, bias: Optional[Tensor]
) -> Tensor:
    """y[..., N] = x[..., K] @ W.T (+ bias), W = (unpack(packed) - zero) * scale per group of group_size."""
    if not uses_triton(x, group_size):
        return reference_int4_linear(x, packed, scale, zero, group_size, bias)
    k = x.shape[-1]
    y = int4_weight_only_matmul(x.reshape(-1, k), packed, scale, zero, group_size, bias)
    return y.reshape(*x.shape[:-1], packed.shape[0])


@int4_weight_only_linear.register_fake
def _int4_weight_only_linear_fake(
    x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int, bias: Optional[Tensor]
) -> Tensor:
    torch._check(packed.dim() == 2 and x.shape[-1] == 2 * packed.shape[1], lambda: "x [..., K] needs packed [N, K/2]")
    torch._check(x.shape[-1] % group_size == 0, lambda: "K must be divisible by group_size")
    return x.new_empty((*x.shape[:-1], packed.shape[0]))
