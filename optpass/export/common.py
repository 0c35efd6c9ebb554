"""What every exporter reads from an optimized model: each linear's weights in the canonical quantized format
(`backends/quant_format.py`), the decoder blocks that remain, and the record of the decisions a serving
engine cannot reproduce, written beside (or into) the exported weights."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optpass.backends.cpu.quant_linear import Int4Linear, Int8Linear
from optpass.backends.quant_format import dequantize_int4, dequantize_int8, unpack_int4
from optpass.errors import ExportError

EXPORT_FORMAT = "optpass-export"
# passes whose effect is entirely in the weights / module structure an exporter writes
IN_WEIGHTS = {
    "quantize": "quantized weights (AWQ scales already folded in)",
    "dead_code": "eval-mode no-ops removed: nothing to write",
    "layer_skip": "removed blocks left out, the others renumbered",
}
# passes that change what the model computes beyond its weights: an engine loading the export runs without them
CHANGES_OUTPUTS = {"linear_attention", "sparse_attention", "dynamic_skip"}


@dataclass(frozen=True)
class LinearWeights:
    """One linear layer's weight as exporters need it. `kind`: "int4" (q uint8 [N, K] in [0, 15], scale / zero
    [N, G], W = (q - zero) * scale), "int8" (q int8 [N, K], scale [N] or [N, G], W = q * scale) or "float"
    (`weight` [N, K]); `group_size` 0 means per output channel."""

    name: str
    kind: str
    out_features: int
    in_features: int
    group_size: int = 0
    q: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight optpass computes with."""
        if self.kind == "int4":
            return dequantize_int4(self.q, self.scale, self.zero, self.group_size)
        if self.kind == "int8":
            return dequantize_int8(self.q, self.scale)
        return self.weight.float()

    def permute_rows(self, index: torch.Tensor) -> LinearWeights:
        """The same layer with its output rows reordered (scales and zero points move with their rows)."""
        pick = (lambda t: None if t is None else t[index].contiguous())
        return replace(self, q=pick(self.q), scale=pick(self.scale), zero=pick(self.zero),
                       weight=pick(self.weight), bias=pick(self.bias))


def linear_weights(name: str, module: nn.Module) -> LinearWeights:
    """Read `module` (nn.Linear, Int8Linear or Int4Linear); anything else is an `ExportError` naming it."""
    bias = None if module.bias is None else module.bias.detach().float()
    if isinstance(module, Int4Linear):
        return LinearWeights(name, "int4", module.out_features, module.in_features, module.group_size,
                             q=unpack_int4(module.qweight), scale=module.scale.float(), zero=module.zero.float(),
                             bias=bias)
    if isinstance(module, Int8Linear):
        return LinearWeights(name, "int8", module.out_features, module.in_features, module.group_size,
                             q=module.qweight, scale=module.scale.float(), bias=bias)
    if type(module) is nn.Linear:
        return LinearWeights(name, "float", module.out_features, module.in_features, weight=module.weight.detach(),
                             bias=bias)
    raise ExportError(f"{name}: a {type(module).__name__} has no exported form (only nn.Linear, Int8Linear and "
                      "Int4Linear are written)")


def kept_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(original index, block) of the decoder blocks layer skipping kept; the exported model numbers them 0..n-1
    (a removed block is the identity on the residual stream, so leaving it out computes the same thing)."""
    from optpass.passes.layer_skip import RemovedBlock, decoder_layers

    layers = decoder_layers(model)
    if layers is None:
        raise ExportError(f"{type(model).__name__}: no decoder block list (model.model.layers) to export")
    return [(i, block) for i, block in enumerate(layers) if not isinstance(block, RemovedBlock)]


def renumber(name: str, index_map: dict[int, int], prefix: str = "model.layers.") -> str:
    """`model.layers.7.x` -> `model.layers.5.x` when blocks before 7 were removed."""
    if not name.startswith(prefix):
        return name
    index, _, rest = name[len(prefix):].partition(".")
    return f"{prefix}{index_map[int(index)]}.{rest}"


def decisions_not_exported(state: dict[str, Any], engine: str) -> list[dict[str, Any]]:
    """The applied passes (and decode runtime) `engine` has no equivalent for, each with what it does there."""
    out = []
    for record in state.get("passes", []):
        name = record.get("name")
        if name in IN_WEIGHTS:
            continue
        effect = ("changes outputs: " + engine + " computes the model without it") if name in CHANGES_OUTPUTS \
            else ("serving policy: configure " + engine + "'s own equivalent, if any")
        out.append({"pass": name, "config": record.get("config"), "effect": effect})
    quantize = next((r for r in state.get("passes", []) if r.get("name") == "quantize"), None)
    if quantize and any(m.get("w8a8_min_rows") for m in quantize.get("state", {}).get("modules", {}).values()):
        out.append({"pass": "quantize", "config": {"w8a8": True},
                    "effect": "weights exported weight-only; W8A8 prefill rows not kept"})
    if state.get("runtime"):
        out.append({"pass": "runtime", "config": state["runtime"],
                    "effect": "optpass's decode runtime (compiled step, KV settings)"})
    changed = [d["pass"] for d in out if d["pass"] in CHANGES_OUTPUTS]
    if changed:
        warnings.warn(f"export to {engine}: {', '.join(changed)} change what optpass's model computes and have no "
                      f"equivalent there; {engine} runs the model without them", stacklevel=3)
    return out


def export_state(model: nn.Module, fmt: str, engine: str, details: dict[str, Any]) -> dict[str, Any]:
    """optpass's state record (`checkpoint.state_record`) marked as an export, with what the format kept, what
    it could not express, and `details` (the exporter's own measurements)."""
    from optpass.checkpoint import state_record

    state = state_record(model)
    state["format"] = EXPORT_FORMAT
    state["export"] = {"format": fmt, "not_exported": decisions_not_exported(state, engine), **details}
    return state


def write_state(directory: Path, state: dict[str, Any]) -> Path:
    from optpass.checkpoint import STATE_FILE

    path = directory / STATE_FILE
    path.write_text(json.dumps(state, indent=2, default=str))
    return path


def error_summary(pairs: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> dict[str, Any]:
    """Max |W_exported - W_optpass| over layers: absolute, relative to the layer's max |W|, and in quantization
    steps (when the step of each block of consecutive inputs is given, [N, blocks]), plus the whole model's
    relative Frobenius error."""
    worst_abs, worst_rel, worst_steps, num, den, where = 0.0, 0.0, 0.0, 0.0, 0.0, ""
    for name, exported, reference, step in pairs:
        diff = (exported.float() - reference.float()).abs()
        peak = float(diff.max()) if diff.numel() else 0.0
        rel = peak / max(float(reference.abs().max()), 1e-30)
        if rel > worst_rel:
            worst_rel, where = rel, name
        worst_abs = max(worst_abs, peak)
        if step is not None:
            per_block = diff.view(step.shape[0], step.shape[1], -1).amax(dim=-1)
            worst_steps = max(worst_steps, float((per_block / step.float().clamp_min(1e-30)).max()))
        num += float(torch.linalg.vector_norm(diff)) ** 2
        den += float(torch.linalg.vector_norm(reference.float())) ** 2
    return {"max_abs": worst_abs, "max_rel_to_layer_max": worst_rel, "worst_layer": where,
            "max_in_steps": worst_steps, "rel_frobenius": (num / max(den, 1e-300)) ** 0.5, "layers": len(pairs)}
