"""ONNX-graph rewrites `optimize_onnx` can plan, in a registry keyed by name (as `passes/` for the FX path).

A rewrite turns the indexed graph into `Candidate`s priced by the shared cost model (`cost_models/`), and
turns the candidates the quality guard kept into an in-place onnx-ir rewrite.
- `quantize`: MatMul initializers -> MatMulNBits, in two decision groups like `passes/quantize.py` (blocks,
  LM head), int4 g{32,64,128} or int8; weight bytes and decode GEMV time from `cost_models.quantization`.
- `attention`: the detected softmax(q k^T) v patterns, reported with heads / KV heads; no fused ORT attention
  rewrite exists yet, so its candidates say so (a decision is always explained, never silently absent).
"""

from __future__ import annotations

import onnx_ir as ir

from optpass.backends.onnx.graph_sites import OnnxLinear
from optpass.backends.onnx.quantize_matmul import Scheme, quantize_matmuls, unsupported
from optpass.cost_models.hardware import HardwareSpec
from optpass.cost_models.model_cost import model_estimate
from optpass.cost_models.quantization import linear_seconds, weight_bytes
from optpass.errors import UnknownPassError
from optpass.pass_base import Candidate
from optpass.sites import ModelGraph

PATHS = ("graph",)


class OnnxRewrite:
    name: str = ""

    def candidates(self, graph: ModelGraph, linears: list[OnnxLinear], spec: HardwareSpec) -> list[Candidate]:
        raise NotImplementedError

    def apply(self, model: ir.Model, chosen: list[Candidate], accuracy_level: int | None = None) -> list[str]:
        """Rewrite `model` in place for `chosen`; returns the rewritten site names."""
        return []


REWRITES: dict[str, type[OnnxRewrite]] = {}


def register(cls: type[OnnxRewrite]) -> type[OnnxRewrite]:
    REWRITES[cls.name] = cls
    return cls


def get_rewrite(name: str) -> OnnxRewrite:
    if name not in REWRITES:
        raise UnknownPassError(f"unknown ONNX-graph pass {name!r}; ONNX passes: {', '.join(sorted(REWRITES))}")
    return REWRITES[name]()


def _skip(pass_name: str, sites: tuple[str, ...], reason: str, label: str = "") -> Candidate:
    return Candidate(pass_name, sites, viable=False, reason=reason, label=label, paths=PATHS)


def _tied(lin: OnnxLinear) -> bool:
    """The float weight has other users (a tied embedding), so quantizing the head keeps it in the file."""
    return len(lin.weight.uses()) > 1


@register
class QuantizeRewrite(OnnxRewrite):
    name = "quantize"
    schemes: tuple[Scheme, ...] = (Scheme(4, 32), Scheme(8))

    def __init__(self, schemes: tuple[Scheme, ...] | None = None) -> None:
        self.schemes = schemes or self.schemes

    def candidates(self, graph: ModelGraph, linears: list[OnnxLinear], spec: HardwareSpec) -> list[Candidate]:
        if not linears:
            return [_skip(self.name, (), "no MatMul with a constant weight in the graph")]
        rows = graph.example_tokens
        groups = {"blocks": [lin for lin in linears if not lin.site.is_output_head],
                  "lm_head": [lin for lin in linears if lin.site.is_output_head]}
        found = []
        for group, members in groups.items():
            for scheme in self.schemes if members else ():
                label = f"{group} {scheme.label}"
                ok = [lin for lin in members if unsupported(lin, scheme) is None]
                if not ok:
                    found.append(_skip(self.name, tuple(m.site.name for m in members),
                                                unsupported(members[0], scheme) or "", label=label))
                    continue
                d_lat = sum(linear_seconds(lin.site, "int4" if scheme.bits == 4 else "int8", rows, spec, scheme.block_size)
                            - linear_seconds(lin.site, "fp32", rows, spec) for lin in ok)
                d_mem = sum(weight_bytes(lin.site, "int4" if scheme.bits == 4 else "int8", scheme.block_size)
                            - (0 if _tied(lin) else weight_bytes(lin.site, "fp32")) for lin in ok)
                skipped = len(members) - len(ok)
                found.append(Candidate(
                    self.name, tuple(lin.site.name for lin in ok),
                    params={"group": group, "bits": scheme.bits, "block_size": scheme.block_size},
                    estimate=model_estimate(graph, spec, d_lat, d_mem), label=label, paths=PATHS,
                    reason=f"{skipped} site(s) stay float (shape)" if skipped else ""))
        return found

    def apply(self, model: ir.Model, chosen: list[Candidate], accuracy_level: int | None = None) -> list[str]:
        plan = {site: Scheme(c.params["bits"], c.params["block_size"]) for c in chosen for site in c.sites}
        return list(quantize_matmuls(model, plan, accuracy_level))


@register
class AttentionRewrite(OnnxRewrite):
    name = "attention"

    def candidates(self, graph: ModelGraph, linears: list[OnnxLinear], spec: HardwareSpec) -> list[Candidate]:
        if not graph.attentions:
            return [_skip(self.name, (), "no softmax(q k^T) v pattern found")]
        shapes = sorted({(a.num_heads, a.num_kv_heads, a.head_dim) for a in graph.attentions})
        return [_skip(
            self.name, tuple(a.name for a in graph.attentions),
            f"{len(graph.attentions)} attention patterns (heads, kv heads, head dim) {shapes}; priced in the "
            "baseline, but no fused ONNX Runtime attention rewrite is implemented yet", label="fused attention")]

