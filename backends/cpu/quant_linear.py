"""Quantized linear modules that call PyTorch's packed CPU kernels (and the Triton ops on CUDA).

y[..., N] = x[..., K] @ W.T (+ b) with W stored in the canonical format of `backends/quant_format.py`:
- `Int8Linear`: decode rows (M <= 8) use optpass's memory-bound GEMV (`gemv_ops.py`, fp32 activations);
  M >= `w8a8_min_rows` (opt-in, at the cost model's crossover) uses W8A8 dynamic: activations quantized per
  token and `torch._int_mm` (VNNI); other M >= `dequant_min_rows` (32; 16 for vocabulary-sized weights)
  dequantize to bf16 for a compute-bound GEMM; the rows in between use `aten._weight_int8pack_mm`.
- `Int4Linear`: up to 32 rows use optpass's packed int4 GEMV on AVX-512 VNNI CPUs (8 rows a pass; faster than
  tinygemm at every row count at SmolLM2's shapes, exact integer sums); elsewhere `aten._weight_int4pack_mm_for_cpu`
  on the tinygemm layout below `dequant_min_rows` (64) rows. From there the weight is dequantized to bf16 for a
  compute-bound GEMM.
Eager dequantization goes piecewise into one reused bf16 workspace (`optpass::dequant_bf16_`, C++): built
from plain ops, its weight-sized temporaries landed on freshly mapped pages every call and cost ~3x the GEMM.

The row thresholds come from `python benchmarks/linear_kernels.py` (every SmolLM2 linear shape, this CPU,
2 threads): per M, the fastest kernel.
PyTorch's packed kernels are fast only with bf16 activations (fp32 takes a reference path ~10x slower), so
they run in `act_dtype` (bf16 by default); outputs come back in the input's dtype.
Canonical tensors are persistent buffers (what a checkpoint stores); kernel layouts are derived ones.
"""

from __future__ import annotations


import torch
from torch import nn

from optpass.backends.cpu import gemv_ops
from optpass.backends.triton import ops as _triton_ops  # noqa: F401 - registers the CUDA ops
from optpass.backends.quant_format import (
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

aten = torch.ops.aten
LARGE_WEIGHT = 1 << 24  # elements (e.g. SmolLM2's 49152 x 576 head)
# int4 rows that still run the packed GEMV (in passes of 8): at 16 rows dequantizing the whole weight to bf16
# made SmolLM2's 16-token prefill 1.37x slower than tinygemm had been (cost_model_accuracy.py); around 32 rows
# the GEMV's passes cost about what one dequantize does
GEMV_CHUNKED_ROWS = 32



def _refresh_after_load(module: nn.Module, _keys: object) -> None:
    module.refresh_kernels()

class QuantizedLinear(nn.Module):
    """Shared shape handling: flatten leading dims, GEMM in `act_dtype`, add bias, restore dtype."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, act_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features, self.act_dtype = in_features, out_features, act_dtype
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        # kernel layouts derive from the canonical tensors: rebuild them whenever a state dict is loaded
        # a module-level function, not a lambda: Inductor pickles modules into its cache key
        self.register_load_state_dict_post_hook(_refresh_after_load)

    def refresh_kernels(self) -> None:
        """Recompute derived (non-persistent) kernel buffers from the canonical ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self._matmul(x.reshape(-1, self.in_features))
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def dequantized_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows), in_features] float: the weight's rows (output channels) at `rows`, for a tied input
        embedding that looks them up (`head_embedding.py`)."""
        raise NotImplementedError

    def workspace_args(self) -> tuple[torch.Tensor | None, int]:
        """(zero points or None, group size or 0): what `optpass::dequant_bf16_` needs besides qweight / scale."""
        raise NotImplementedError

    def _dequantized_matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        """Compute-bound rows: the weight dequantized to `act_dtype` (fp32 on a CPU without native bf16, where
        a bf16 GEMM is emulated), then a GEMM (into the reused workspace when the C++ kernel can take it)."""
        dtype = gemm_dtype(self.act_dtype)
        if _fused_dequant_ok(dtype):
            zero, group = self.workspace_args()
            return _workspace_gemm(x2d, self.qweight, self.scale, zero, group, self.out_features, self.in_features)
        return _dequantized_gemm(x2d, self.dequantized_weight(), dtype)

    decode_tensors: tuple[str, ...] = ()

    def decode_bytes(self) -> int:
        """Bytes a decode step (few rows) reads for this layer: the tensors its CPU kernel streams."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self.decode_tensors)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, act_dtype={self.act_dtype}"


def _detect_native_bf16() -> bool:
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


# read once at import: a compiled decode step traces `gemm_dtype`, and dynamo cannot trace the CPU query
_NATIVE_BF16 = _detect_native_bf16()


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX). Without it oneDNN emulates a bf16 GEMM,
    measured 5x slower than fp32 (a 512 x 640 x 2048 GEMM: 24.4 vs 4.7 ms on a 2-core AVX-512 Xeon)."""
    return _NATIVE_BF16


def gemm_dtype(act_dtype: torch.dtype) -> torch.dtype:
    """The dtype compute-bound (prefill) GEMMs run in: `act_dtype`, except bf16 on a CPU without native bf16."""
    return torch.float32 if act_dtype == torch.bfloat16 and not native_bf16() else act_dtype


def _use_dequant(rows: int, dequant_min_rows: int | None, act_dtype: torch.dtype) -> bool:
    """The fused int8pack / tinygemm kernels are fast with bf16 activations only (fp32: ~25x slower here, and
    their derived scale buffers are bf16); other activation dtypes take the dequantize-then-GEMM path."""
    return act_dtype != torch.bfloat16 or (dequant_min_rows is not None and rows >= dequant_min_rows)


def _dequantized_gemm(x2d: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Compute-bound rows: dequantize once per call, then a bf16 GEMM (weight-only kernels run ~5x slower here)."""
    return torch.nn.functional.linear(x2d.to(dtype), weight.to(dtype))


_CHUNK_ELEMENTS = 1 << 21  # weight elements dequantized per piece: a 4 MiB bf16 workspace, reused
_scratch: list[torch.Tensor] = [torch.empty(0, dtype=torch.bfloat16)]


def _workspace(numel: int) -> torch.Tensor:
    if _scratch[0].numel() < numel:
        _scratch[0] = torch.empty(numel, dtype=torch.bfloat16)
    return _scratch[0][:numel]


def _fused_dequant_ok(act_dtype: torch.dtype) -> bool:
    """The C++ dequantize-into-workspace path: eager CPU calls with bf16 activations and the kernels built
    (traced graphs keep the plain ops, which Inductor fuses and plans buffers for itself)."""
    return act_dtype == torch.bfloat16 and gemv_ops.available() and not torch.compiler.is_compiling()


def _workspace_gemm(x2d: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                    group_size: int, out_features: int, in_features: int) -> torch.Tensor:
    """bf16 GEMM on weights dequantized piecewise into one reused workspace (`optpass::dequant_bf16_`): no
    weight-sized temporaries, whose fresh pages made the eager dequantize cost ~3x the GEMM it fed.
    The output is a contiguous y [M, N] (a transposed result slows every op downstream)."""
    x = x2d.to(torch.bfloat16)
    step = max(1, _CHUNK_ELEMENTS // in_features)
    y = torch.empty(x.shape[0], out_features, dtype=torch.bfloat16) if step < out_features else None
    for a in range(0, out_features, step):
        b = min(out_features, a + step)
        w = _workspace((b - a) * in_features).view(b - a, in_features)
        torch.ops.optpass.dequant_bf16_(w, q[a:b], scale[a:b], None if zero is None else zero[a:b], group_size)
        if y is None:
            return torch.nn.functional.linear(x, w)
        y[:, a:b] = torch.nn.functional.linear(x, w)
    return y


class Int8Linear(QuantizedLinear):
    """Weight-only int8, symmetric per output channel or per group of `group_size` inputs (`scale` [N] or
    [N, K / group_size]); W8A8 dynamic above `w8a8_min_rows` rows (per-channel scales only)."""

    @property
    def decode_tensors(self) -> tuple[str, ...]:  # type: ignore[override]
        if self.kernel_gemv is None:
            return ("qweight", "scale")
        return ("kernel_gemv", "scale" if self.kernel_gemv_scale is None else "kernel_gemv_scale")

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 act_dtype: torch.dtype = torch.bfloat16, w8a8_min_rows: int | None = None,
                 dequant_min_rows: int | None = None) -> None:
        super().__init__(q.shape[1], q.shape[0], bias, act_dtype)
        self.group_size = q.shape[1] // scale.shape[1] if scale.dim() == 2 else 0
        if self.group_size and w8a8_min_rows is not None:
            raise ValueError("Int8Linear: W8A8 needs per-channel scales, not group scales")
        # int8pack slows down with N: a vocabulary-sized head is faster dequantized from 16 rows, others from 32;
        # group scales have no int8pack kernel, so rows above the GEMV's go straight to the dequantized GEMM
        big = q.numel() >= LARGE_WEIGHT
        default_rows = gemv_ops.MAX_ROWS + 1 if self.group_size else (16 if big else 32)
        self.dequant_min_rows = dequant_min_rows if dequant_min_rows is not None else default_rows
        self.register_buffer("qweight", q.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.w8a8_min_rows = w8a8_min_rows
        self.use_gemv = gemv_ops.available()  # resolved (and built) here, never inside a compiled region
        self.refresh_kernels()

    def refresh_kernels(self) -> None:
        self.register_buffer("kernel_scale", self.scale.to(self.act_dtype) if not self.group_size else None,
                             persistent=False)
        # decode rows read a packed copy (output channels in vector lanes) where that kernel exists: one more
        # byte per weight in memory, but a verify step's rows cost far less than in the row layout
        packed, scale = None, None
        if self.use_gemv and gemv_ops.packed_available():
            if self.group_size:
                scale = gemv_ops.pack_group_scales(self.scale, self.group_size)
            packed = gemv_ops.pack_rows(self.qweight) if scale is not None or not self.group_size else None
        self.register_buffer("kernel_gemv", packed, persistent=False)
        self.register_buffer("kernel_gemv_scale", scale, persistent=False)  # group scales, packed alike
        t = self.qweight.t().contiguous() if self.w8a8_min_rows else None
        self.register_buffer("qweight_t", t, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_dtype: torch.dtype = torch.bfloat16,
                    w8a8_min_rows: int | None = None, group_size: int | None = None) -> Int8Linear:
        q, scale = quantize_int8(linear.weight.detach(), group_size)
        return cls(q, scale, linear.bias, act_dtype, w8a8_min_rows)

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        rows = x2d.shape[0]
        if x2d.is_cuda:
            if self.group_size:
                return _dequantized_gemm(x2d, self.dequantized_weight(), self.act_dtype)
            return torch.ops.optpass.int8_weight_only_linear(x2d.to(self.act_dtype), self.qweight, self.scale, None)
        if rows <= gemv_ops.MAX_ROWS and self.use_gemv:
            if self.kernel_gemv is not None:
                scale = self.scale if self.kernel_gemv_scale is None else self.kernel_gemv_scale
                return torch.ops.optpass.gemv_int8_packed(x2d.float(), self.kernel_gemv, scale, self.out_features)
            return torch.ops.optpass.gemv_int8(x2d.float(), self.qweight, self.scale)
        if self.w8a8_min_rows is not None and rows >= self.w8a8_min_rows:
            return self._w8a8(x2d)
        if self.group_size or _use_dequant(rows, self.dequant_min_rows, self.act_dtype):
            return self._dequantized_matmul(x2d)
        return aten._weight_int8pack_mm(x2d.to(self.act_dtype), self.qweight, self.kernel_scale)

    def _w8a8(self, x2d: torch.Tensor) -> torch.Tensor:
        """Dynamic per-token int8 activations: y = (xq @ qT) * s_x * s_w, int32 accumulation (VNNI)."""
        x = x2d.float()
        s_x = (x.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)
        xq = torch.round(x / s_x).clamp(-127, 127).to(torch.int8)
        return torch._int_mm(xq, self.qweight_t).float() * s_x * self.scale

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scale)

    def dequantized_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return dequantize_int8(self.qweight[rows], self.scale[rows])

    def workspace_args(self) -> tuple[torch.Tensor | None, int]:
        return None, self.group_size

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", group_size={self.group_size}" if self.group_size else "")


class Int4Linear(QuantizedLinear):
    """Weight-only int4, group-wise asymmetric with float zero points. Up to `GEMV_CHUNKED_ROWS` rows read a packed
    copy through optpass's VNNI GEMV (`gemv_ops.pack_int4_rows`) where it exists; otherwise tinygemm below
    `dequant_min_rows` rows; the bf16 dequantized GEMM from there."""

    @property
    def decode_tensors(self) -> tuple[str, ...]:  # type: ignore[override]
        if self.kernel_gemv is None:
            return ("kernel_weight", "kernel_scales_zeros")
        return ("kernel_gemv", "kernel_gemv_scale", "kernel_gemv_offset")

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, act_dtype: torch.dtype = torch.bfloat16,
                 dequant_min_rows: int | None = 64) -> None:
        super().__init__(packed.shape[1] * 2, packed.shape[0], bias, act_dtype)
        self.group_size, self.tinygemm_min_rows = group_size, dequant_min_rows
        self.register_buffer("qweight", packed.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("zero", zero.float().contiguous())
        self.use_gemv = gemv_ops.available()  # resolved (and built) here, never inside a compiled region
        self.refresh_kernels()

    def refresh_kernels(self) -> None:
        q = unpack_int4(self.qweight)
        # a meta-device skeleton (streaming) has no values to pack: its kernels are built when a state dict loads
        gemv = gemv_ops.pack_int4_rows(q, self.scale, self.zero, self.group_size) \
            if self.use_gemv and gemv_ops.packed_available() and not self.qweight.is_meta else None
        for name, t in zip(("kernel_gemv", "kernel_gemv_scale", "kernel_gemv_offset"), gemv or (None,) * 3):
            self.register_buffer(name, t, persistent=False)
        # with the packed GEMV no tinygemm copy is kept (one derived copy, not two): rows up to GEMV_CHUNKED_ROWS
        # run the GEMV 8 rows at a time (each pass re-reads the weight), more the dequantized GEMM
        self.dequant_min_rows = GEMV_CHUNKED_ROWS + 1 if gemv else self.tinygemm_min_rows
        weight, sz = tinygemm_layout(q, self.scale, self.zero, self.act_dtype) if gemv is None else (None, None)
        self.register_buffer("kernel_weight", weight, persistent=False)
        self.register_buffer("kernel_scales_zeros", sz, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, act_dtype: torch.dtype = torch.bfloat16) -> Int4Linear:
        q, scale, zero = quantize_int4(linear.weight.detach(), group_size)
        return cls(pack_int4(q), scale, zero, group_size, linear.bias, act_dtype)

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        if x2d.is_cuda:
            return torch.ops.optpass.int4_weight_only_linear(
                x2d.to(self.act_dtype), self.qweight, self.scale, self.zero, self.group_size, None)
        if self.kernel_gemv is not None and x2d.shape[0] < self.dequant_min_rows:
            rows = x2d.float().split(gemv_ops.MAX_ROWS)  # rows are independent: chunking changes no result
            out = [torch.ops.optpass.gemv_int4_packed(r, self.kernel_gemv, self.kernel_gemv_scale,
                                                      self.kernel_gemv_offset, self.out_features) for r in rows]
            return out[0] if len(out) == 1 else torch.cat(out)
        if self.kernel_weight is None or _use_dequant(x2d.shape[0], self.dequant_min_rows, self.act_dtype):
            return self._dequantized_matmul(x2d)
        return aten._weight_int4pack_mm_for_cpu(x2d.to(self.act_dtype), self.kernel_weight, self.group_size,
                                                self.kernel_scales_zeros)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int4(unpack_int4(self.qweight), self.scale, self.zero, self.group_size)

    def dequantized_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return dequantize_int4(unpack_int4(self.qweight[rows]), self.scale[rows], self.zero[rows], self.group_size)

    def workspace_args(self) -> tuple[torch.Tensor | None, int]:
        return self.zero, self.group_size

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


def tinygemm_layout(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    act_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpacked int4 [N, K] (0..15), scale and zero [N, K / group] -> tinygemm's (weight, scales_and_zeros)
    operands of `aten._weight_int4pack_mm_for_cpu`."""
    weight = aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    # tinygemm computes (q - 8) * s + z_f; ours is (q - zero) * s, so z_f = (8 - zero) * s.
    sz = torch.stack([scale, (8.0 - zero) * scale], dim=-1).transpose(0, 1).contiguous()
    return weight, sz.to(act_dtype)


def int4_supported(in_features: int, out_features: int, group_size: int) -> str | None:
    """None if the CPU int4 kernel takes this shape, else the reason it cannot."""
    if in_features % group_size:
        return f"in_features {in_features} is not divisible by group_size {group_size}"
    if in_features % 2:
        return f"in_features {in_features} is odd (int4 packs two values per byte)"
    return None
