"""An input embedding that reads its rows from the quantized LM head it was tied to.

A tied model (Gemma-3, SmolLM2) keeps one [vocab, hidden] table for the input lookup and the output head. When
the head was quantized, the float table used to stay resident for lookups: Gemma-3 270M's 262k x 640 fp32 table
(671 MB) sat beside its int8 copy, so the "optimized" model held more memory than the fp32 one (1177 vs 1023
MiB). A decode step looks up a handful of rows, so dequantizing them from the head's rows costs nothing
measurable and the float table goes. The rows then carry the head's quantization error: the quantize pass
measures the head and this lookup as one decision against the quality budget, and rolls both back together.

Only a plain lookup, optionally times a constant (Gemma's `embed_scale`), is replaced; `share_reason` says why
anything else keeps its float table.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from optpass.backends.cpu.quant_linear import QuantizedLinear

_PROBE_ROWS = 64


class HeadRowsEmbedding(nn.Module):
    """`embedding(ids) = dequantized head rows[ids] * output_scale`. The head is referenced, not registered as a
    submodule: its tensors stay saved once, under the head's own name."""

    def __init__(self, head: QuantizedLinear | nn.Linear, output_scale: float = 1.0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        object.__setattr__(self, "head", head)
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.output_scale, self.dtype = float(output_scale), dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1)
        rows = self.head.dequantized_rows(ids) if isinstance(self.head, QuantizedLinear) else self.head.weight[ids]
        if self.output_scale != 1.0:
            rows = rows * self.output_scale
        return rows.to(self.dtype).view(*input_ids.shape, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        """The whole table, dequantized on every access, for exporters that write it (GGUF, compressed-tensors);
        lookups never build it."""
        return self.head.dequantized_weight().to(self.dtype)

    def float_copy(self) -> HeadRowsEmbedding:
        """The same lookup over the dequantized table held in float: what an export that stores the table
        serves (the exporters' float twins use it)."""
        table = nn.Linear(self.embedding_dim, self.num_embeddings, bias=False, device="meta")
        table.weight = nn.Parameter(self.weight.detach(), requires_grad=False)
        return HeadRowsEmbedding(table, self.output_scale, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the quantized head, scale={self.output_scale:g}"


def _lookup_scale(embedding: nn.Module) -> tuple[float | None, str]:
    """(c, "") when `embedding(ids) == weight[ids] * c` on probe rows, else (None, why not)."""
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None, f"{type(embedding).__name__} has no [vocab, hidden] weight"
    ids = torch.arange(min(_PROBE_ROWS, weight.shape[0]), device=weight.device)
    with torch.no_grad():
        try:
            out = embedding(ids[None])[0].float()
        except Exception as exc:  # noqa: BLE001 - any failure means: not a plain lookup
            return None, f"{type(embedding).__name__} cannot be probed ({type(exc).__name__}: {exc})"
        base = weight[ids].float()
        c = float((out * base).sum() / (base * base).sum().clamp_min(1e-30))
        if out.shape != base.shape or not torch.allclose(out, base * c, rtol=1e-5, atol=1e-6 * float(out.abs().max())):
            return None, f"{type(embedding).__name__} is not a row lookup times a constant"
    return c, ""


def share_reason(model: nn.Module, head: nn.Linear) -> str:
    """Why the input embedding cannot read its rows from `head` once quantized ("" if it can)."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if embedding is None:
        return "no input embedding"
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.data_ptr() != head.weight.data_ptr():
        return "the head is not tied to the input embedding"
    return _lookup_scale(embedding)[1]


def share_head_rows(model: nn.Module, head: QuantizedLinear) -> tuple[str, nn.Module]:
    """Replace the input embedding (tied to the head before it was quantized; `share_reason` said so) by
    `HeadRowsEmbedding(head)`; return (its path, the original module) for rollback."""
    embedding = model.get_input_embeddings()
    scale, _ = _lookup_scale(embedding)
    path = module_path(model, embedding)
    set_module(model, path, HeadRowsEmbedding(head, scale or 1.0, embedding.weight.dtype))
    return path, embedding


def layout_record(head_path: str, output_scale: float, dtype: torch.dtype) -> dict[str, Any]:
    """The checkpoint's record of a shared embedding (`passes/quantize.quantized_modules` format)."""
    return {"scheme": "head_rows", "head": head_path, "output_scale": float(output_scale),
            "dtype": str(dtype).removeprefix("torch.")}


def from_record(model: nn.Module, spec: dict[str, Any]) -> HeadRowsEmbedding:
    return HeadRowsEmbedding(model.get_submodule(spec["head"]), spec["output_scale"], getattr(torch, spec["dtype"]))


def module_path(model: nn.Module, module: nn.Module) -> str:
    return next(p for p, m in model.named_modules() if m is module)


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, module)


def shared_tables(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<path>.weight": float table} for every embedding that reads a quantized head: what a format that stores
    the embedding as its own tensor writes for it."""
    return {f"{p}.weight": m.weight.detach().contiguous() for p, m in model.named_modules()
            if isinstance(m, HeadRowsEmbedding)}
