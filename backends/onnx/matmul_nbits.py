"""optpass's canonical quantized weights in ONNX Runtime's `com.microsoft::MatMulNBits` layout, and the
torch op + onnxscript translation that makes `torch.onnx.export(dynamo=True)` emit that node.

MatMulNBits computes Y[..., N] = A[..., K] @ dequant(B).T with, per output row n and K-block b,
    dequant(B)[n, k] = (q[n, k] - zp[n, b]) * scale[n, b],   b = k // block_size,
B uint8 [N, K / block_size, block_size * bits / 8], low nibble first for 4 bits (the canonical int4 packing,
reshaped), scales [N, K / block_size], zero points either packed uint8 or, as here for int4, floats of the
scale's type (the canonical float zero; ORT computes (q - zp) * scale, checked in tests/test_onnx.py).
int8 (symmetric per channel, q in [-127, 127]) maps exactly to bits=8: q + 128 with the default zero point
128 and the channel's scale repeated over every block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxscript
import torch
from torch import nn

from optpass.backends.quant_format import quantize_int4, quantize_int8

MSFT = onnxscript.values.Opset("com.microsoft", 1)


def _schema() -> onnx.defs.OpSchema:
    """onnx ships no schemas for ORT's contrib ops; the exporter needs one to tell inputs from attributes."""
    P, Opt = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.FormalParameterOption.Optional
    A, INT = onnx.defs.OpSchema.Attribute, onnx.defs.OpSchema.AttrType.INT
    return onnx.defs.OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[P("A", "T1"), P("B", "T2"), P("scales", "T1"), P("zero_points", "T3", param_option=Opt)],
        outputs=[P("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
                          ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
        attributes=[A("K", INT, ""), A("N", INT, ""), A("bits", INT, ""), A("block_size", INT, ""),
                    A("accuracy_level", INT, "", required=False)])


_MATMUL_NBITS = onnxscript.values.Op(MSFT, "MatMulNBits", _schema())
INT8_BLOCK = 32  # int8 blocks only repeat the channel scale; any power of two dividing K works
# accuracy_level when none is given. Export: 0 for both (fp32 activations, PyTorch's math; int8 goes through
# `split_int8`). The ONNX-input path writes int8 as one bits=8 node, whose only fast CPU path is level 4.
DEFAULT_ACCURACY = {4: 0, 8: 0}
INPUT_DEFAULT_ACCURACY = {4: 0, 8: 4}


@dataclass(frozen=True)
class NBitsWeight:
    """One weight in MatMulNBits layout (numpy, ready to become ONNX initializers)."""

    packed: np.ndarray  # uint8 [N, K / block, block * bits / 8]
    scales: np.ndarray  # fp32 [N, K / block]
    zeros: np.ndarray | None  # fp32 [N, K / block] (int4) or None (int8: default zero point 128)
    in_features: int
    out_features: int
    bits: int
    block_size: int


def from_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> NBitsWeight:
    """Canonical int4 (packed [N, K/2], scale / zero [N, G]) -> MatMulNBits bits=4, block = group."""
    n, half = packed.shape
    blocks = (2 * half) // group_size
    return NBitsWeight(packed.contiguous().view(n, blocks, group_size // 2).numpy().copy(),
                       scale.float().contiguous().numpy().copy(), zero.float().contiguous().numpy().copy(),
                       2 * half, n, 4, group_size)


def split_zero(w: NBitsWeight) -> tuple[NBitsWeight, np.ndarray | None]:
    """Float zero points -> (the weight with ORT's default zero point 2^(bits-1), correction C [G, N]).

    ORT's fast MatMulNBits kernels take only integer zero points (float ones fall back to dequantizing the
    whole weight per call, ~100x slower at decode), so the float zero is moved into an exact side term:
    x @ ((q - z) s)^T = x @ ((q - 8) s)^T + groupsum(x) @ C,  C[g, n] = (8 - z[n, g]) s[n, g],
    groupsum(x)[..., g] = sum of x over group g. C adds K*N/8 bytes (a quarter of the int4 weight).
    """
    if w.zeros is None:
        return w, None
    default = 2.0 ** (w.bits - 1)
    corr = ((default - w.zeros) * w.scales).T.astype(np.float32).copy()
    return NBitsWeight(w.packed, w.scales, None, w.in_features, w.out_features, w.bits, w.block_size), corr


def int8_block(in_features: int) -> int | None:
    """Largest supported block (power of two >= 16) dividing K, or None."""
    for block in (128, 64, INT8_BLOCK, 16):
        if in_features % block == 0:
            return block
    return None


def from_int8(q: torch.Tensor, scale: torch.Tensor) -> NBitsWeight:
    """Canonical int8 (q [N, K] in [-127, 127], scale [N]) -> MatMulNBits bits=8, zero point 128."""
    n, k = q.shape
    block = int8_block(k)
    if block is None:
        raise ValueError(f"int8 MatMulNBits needs in_features divisible by 16, got {k}")
    shifted = (q.to(torch.int16) + 128).to(torch.uint8).view(n, k // block, block)
    scales = scale.float()[:, None].expand(n, k // block).contiguous()
    return NBitsWeight(shifted.numpy().copy(), scales.numpy().copy(), None, k, n, 8, block)


def quantize_weight(weight: torch.Tensor, bits: int, block_size: int = 32) -> NBitsWeight:
    """A float weight [N, K] quantized with the canonical recipes, in MatMulNBits layout."""
    if bits == 4:
        from optpass.backends.quant_format import pack_int4

        q, scale, zero = quantize_int4(weight.detach(), block_size)
        return from_int4(pack_int4(q), scale, zero, block_size)
    if bits == 8:
        q, scale = quantize_int8(weight.detach())
        return from_int8(q, scale)
    raise ValueError(f"MatMulNBits bits={bits}; optpass supports 4 and 8")


def dequantize(w: NBitsWeight) -> torch.Tensor:
    """Reference dequantization of a MatMulNBits weight -> fp32 [N, K] (what ORT should compute with)."""
    packed = torch.from_numpy(w.packed).reshape(w.out_features, -1)
    if w.bits == 4:
        q = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2).float()
    else:
        q = packed.float()
    q = q.view(w.out_features, -1, w.block_size)
    zero = torch.from_numpy(w.zeros) if w.zeros is not None else torch.full(w.scales.shape, 2.0 ** (w.bits - 1))
    return ((q - zero[..., None]) * torch.from_numpy(w.scales)[..., None]).reshape(w.out_features, w.in_features)


# --- the torch op the exporter sees, and its ONNX translation ------------------------------------------

@torch.library.custom_op("optpass_onnx::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 in_features: int, out_features: int, bits: int, block_size: int, accuracy_level: int) -> torch.Tensor:
    """Eager reference (dequantize + matmul); only exported graphs run the real kernel."""
    w = NBitsWeight(packed.numpy(), scales.numpy(), None if zeros is None else zeros.numpy(),
                    in_features, out_features, bits, block_size)
    return x @ dequantize(w).to(x.dtype).T


@matmul_nbits.register_fake
def _(x, packed, scales, zeros, in_features, out_features, bits, block_size, accuracy_level):  # noqa: ANN001
    return x.new_empty((*x.shape[:-1], out_features))


def _onnx_matmul_nbits(x, packed, scales, zeros, in_features: int, out_features: int, bits: int,  # noqa: ANN001
                       block_size: int, accuracy_level: int):
    return _MATMUL_NBITS(x, packed, scales, zeros, K=in_features, N=out_features, bits=bits,
                            block_size=block_size, accuracy_level=accuracy_level)


TRANSLATIONS = {torch.ops.optpass_onnx.matmul_nbits.default: _onnx_matmul_nbits}


def split_int8(w: NBitsWeight) -> tuple[NBitsWeight, NBitsWeight, np.ndarray]:
    """A bits=8 weight -> two bits=4 weights (high / low nibble of u = q + 128) and a per-channel side term.

    ORT's bits=8 kernel is fast only with int8 activations (accuracy_level 4, which costs SmolLM2's int8 LM
    head ~2.5% top-1 agreement); with fp32 activations it dequantizes the weight on every call. Exactly:
    (u - 128) s = 16 s (hi - 8) + s (lo - 8) + 8 s, so y = MatMulNBits4(x, hi, 16 s) + MatMulNBits4(x, lo, s)
    + sum(x) * 8 s, two fast fp32-activation int4 kernels reading the same bytes as the int8 weight.
    """
    u = w.packed.astype(np.uint8)
    hi, lo = u >> 4, u & 0x0F

    def pack(nib: np.ndarray) -> np.ndarray:
        return (nib[..., 0::2] | (nib[..., 1::2] << 4)).astype(np.uint8)

    side = (8.0 * w.scales[:, 0]).astype(np.float32)
    return (NBitsWeight(pack(hi), (16.0 * w.scales).astype(np.float32), None, w.in_features, w.out_features, 4, w.block_size),
            NBitsWeight(pack(lo), w.scales, None, w.in_features, w.out_features, 4, w.block_size), side)


class NBitsLinear(nn.Module):
    """A linear exported as MatMulNBits node(s) with integer default zero points, plus exact side terms:
    int4's float zero (`split_zero`), and at accuracy_level 0 int8 as two nibble halves (`split_int8`)."""

    def __init__(self, w: NBitsWeight, bias: torch.Tensor | None, accuracy_level: int | None = None) -> None:
        super().__init__()
        self.accuracy_level = DEFAULT_ACCURACY[w.bits] if accuracy_level is None else accuracy_level
        self.in_features, self.out_features, self.block_size = w.in_features, w.out_features, w.block_size
        side = None
        if w.bits == 8 and self.accuracy_level == 0:
            high, low, side = split_int8(w)
            parts, corr = [high, low], None
        else:
            w, corr = split_zero(w)
            parts = [w]
        self.bits = [p.bits for p in parts]
        for i, part in enumerate(parts):
            self.register_buffer(f"packed{i}", torch.from_numpy(part.packed))
            self.register_buffer(f"scales{i}", torch.from_numpy(part.scales))
        self.register_buffer("zero_correction", None if corr is None else torch.from_numpy(corr))
        self.register_buffer("channel_side", None if side is None else torch.from_numpy(side))
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        for i, bits in enumerate(self.bits):
            part = matmul_nbits(x, getattr(self, f"packed{i}"), getattr(self, f"scales{i}"), None, self.in_features,
                                self.out_features, bits, self.block_size, self.accuracy_level)
            y = part if y is None else y + part
        if self.zero_correction is not None:
            groups = self.in_features // self.block_size
            y = y + x.reshape(*x.shape[:-1], groups, self.block_size).sum(-1) @ self.zero_correction
        if self.channel_side is not None:
            y = y + x.sum(-1, keepdim=True) * self.channel_side
        return y if self.bias is None else y + self.bias


def export_linear(module: nn.Module, accuracy_level: int | None = None) -> nn.Module:
    """The export form of one linear: optpass Int4Linear / Int8Linear -> NBitsLinear; float nn.Linear as is."""
    from optpass.backends.cpu.quant_linear import Int4Linear, Int8Linear

    if isinstance(module, Int4Linear):
        w = from_int4(module.qweight, module.scale, module.zero, module.group_size)
    elif isinstance(module, Int8Linear):
        w = from_int8(module.qweight, module.scale)
    else:
        return module
    return NBitsLinear(w, module.bias, accuracy_level)
