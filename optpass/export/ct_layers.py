"""One optpass layer in compressed-tensors' pack-quantized form, through the package's own lifecycle
(`initialize_module_for_quantization` + `compress_module`, as llm-compressor saves a model).

optpass int8 (symmetric, per channel or group) is written as it is: 8-bit int, symmetric, channel / group;
exact. optpass int4 stores a float zero point per group (each group's minimum exact); compressed-tensors
stores an integer one, so an int4 layer has two encodings:
- "w4a16": 4-bit int, group, asymmetric: z = round(zero), q' = clamp(round(W / scale + z), 0, 15). Every
  weight of a group moves by the same (z - zero) * scale, up to half a step (more where the clamp bites).
  Measured on SmolLM2-135M int4 g32 (whose weights sit exactly on float-minimum grids, being a dequantized
  Q4_1): KL 0.29 nats / top-1 73% against the optpass weights; searching scale and zero for the least
  squared error (an MSE observer) only reaches KL 0.25 / top-1 76%.
- "w8a16": the int4 weight re-quantized to 8-bit int, symmetric, same group size, scale = max |W| / 127:
  at most 1/254 of a group's max |W| per weight (on SmolLM2: 0.054 of an int4 step, KL 0.0012 nats),
  twice the bytes of int4 (half of bf16).
- "float-zero": the codes, scales and float zero points as they are (4-bit int, asymmetric, strategy "block"
  [1, group], zp_dtype float32): exact and int4-sized. compressed-tensors decompresses it and stock
  transformers loads it; vLLM does not serve it (its WNA16 loader takes channel / group strategies with
  integer zero points), so `int4="auto"` never picks it: ask for it by name.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from optpass.errors import ExportError
from optpass.export.common import LinearWeights

VLLM_INT4_ENCODINGS = ("w4a16", "w8a16")  # what vLLM serves, smallest first: the candidates of int4="auto"
INT4_ENCODINGS = (*VLLM_INT4_ENCODINGS, "float-zero")


def integer_zero_grid(lw: LinearWeights) -> LinearWeights:
    """optpass int4 (float zero) -> the nearest integer-zero int4: same scales, z = round(zero), codes re-rounded."""
    n, k = lw.q.shape
    w = lw.dequantized().view(n, lw.scale.shape[1], -1)
    z = lw.zero.round().clamp(0, 15)
    q = torch.round(w / lw.scale[..., None] + z[..., None]).clamp(0, 15)
    return replace(lw, q=q.to(torch.uint8).view(n, k), zero=z)


def symmetric_int8(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric int8 per group, scale = max |W| / 127 (q int8 [N, K], scale [N, G])."""
    n, k = w.shape
    g = w.view(n, k // group_size, group_size)
    scale = (g.abs().amax(dim=-1) / 127.0).clamp_min(1e-12)
    return torch.round(g / scale[..., None]).clamp(-127, 127).to(torch.int8).view(n, k), scale


def engine_layer(lw: LinearWeights, int4: str) -> LinearWeights:
    """The layer as the engine will hold it: int8 unchanged; int4 as `int4` (one of `INT4_ENCODINGS`)."""
    if lw.kind != "int4" or int4 == "float-zero":
        return lw
    if int4 == "w4a16":
        return integer_zero_grid(lw)
    if int4 == "w8a16":
        q, scale = symmetric_int8(lw.dequantized(), lw.group_size)
        return replace(lw, kind="int8", q=q, scale=scale, zero=None)
    raise ExportError(f"int4 encoding {int4!r}; choose one of {INT4_ENCODINGS}")


def scheme_for(lw: LinearWeights) -> Any:
    """The QuantizationScheme of an engine layer (targets filled in by the caller)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    group = {"strategy": "group", "group_size": lw.group_size} if lw.group_size else {"strategy": "channel"}
    if lw.kind == "int4" and not bool((lw.zero == lw.zero.round()).all()):  # "float-zero": see the docstring
        return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=4, type="int", symmetric=False, strategy="block", block_structure=[1, lw.group_size],
            zp_dtype=torch.float32))
    bits, symmetric = (4, False) if lw.kind == "int4" else (8, True)
    return QuantizationScheme(targets=["Linear"],
                              weights=QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, **group))


def scheme_key(scheme: Any) -> str:
    return json.dumps(scheme.weights.model_dump(mode="json"), sort_keys=True)


def compress_layer(lw: LinearWeights, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], torch.Tensor, Any]:
    """(weight_packed / weight_scale / weight_shape [/ weight_zero_point], the weight the package decompresses
    them to, the scheme) for an engine layer (`engine_layer`)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor, compress_module
    from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization

    scheme = scheme_for(lw)
    weight = lw.dequantized()
    layer = nn.Linear(lw.in_features, lw.out_features, bias=False, dtype=dtype)
    layer.weight.data.copy_(weight)
    initialize_module_for_quantization(layer, scheme)
    layer.weight_scale.data.copy_(lw.scale if lw.scale.dim() == 2 else lw.scale[:, None])
    if lw.kind == "int4":  # the package's 4-bit codes and zero points are signed: [0, 15] - 8
        layer.weight_zero_point.data.copy_(lw.zero - 8)
    compress_module(layer, "pack-quantized")
    tensors = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    served = PackedQuantizationCompressor.decompress(dict(tensors), scheme)["weight"].float()
    diff = float((served - weight.to(dtype).float()).abs().max())
    if diff > 1e-6 * float(weight.abs().max()):
        raise ExportError(f"{lw.name}: compressed-tensors does not decompress to the exported weight (max diff {diff:.3g})")
    return tensors, served, scheme
