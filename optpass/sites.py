"""Sites: the places in a captured model that passes rewrite, indexed once by `capture()`.

A site names a module path in the user's model (so a module-level rewrite can find it) and the FX
node(s) it came from (so a graph rewrite can find it too). Shapes are strings so symbolic dims
(`s0`, `s1`) survive serialisation; `ModelGraph.symbols` maps them to the batch / sequence names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import networkx as nx
import torch


@dataclass(frozen=True)
class LinearSite:
    """One `linear` call: y[..., out] = x[..., in] @ W[out, in].T (+ b)."""

    name: str  # module path, e.g. "model.layers.0.self_attn.q_proj"
    node: str  # FX node name
    in_features: int
    out_features: int
    dtype: str
    has_bias: bool
    block: int | None  # index of the repeated block it sits in, None outside blocks
    is_output_head: bool  # produces the model's output logits (LM head): a separate decision for quantization
    tied_to: str | None = None  # parameter this weight shares storage with (tied embeddings)
    layout: str = "linear"  # "linear": W[out, in] (nn.Linear); "conv1d": W[in, out] (GPT-2's Conv1D, addmm)

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class AttentionSite:
    """One fused attention call: softmax(q k^T * scale [+ mask]) v with q [B, H, S, D], k/v [B, Hkv, S_kv, D]."""

    name: str  # module path of the attention module, e.g. "model.layers.0.self_attn"
    node: str
    q_shape: tuple[str, ...]
    k_shape: tuple[str, ...]  # as seen by SDPA (after any GQA repeat)
    num_heads: int
    num_kv_heads: int  # before the GQA repeat: what a KV cache stores
    head_dim: int
    causal: bool
    has_mask: bool
    block: int | None
    kv_entry: tuple[str, str]  # FX nodes holding K and V before the GQA repeat: where a KV cache enters
    kv_projections: tuple[str | None, str | None]  # module paths of the K and V projections

    @property
    def gqa(self) -> bool:
        return self.num_kv_heads < self.num_heads


@dataclass(frozen=True)
class BlockSite:
    """One repeated block (decoder layer, DiT block): x -> x + f(x) residual stages."""

    name: str
    index: int
    cls: str
    residual_adds: int
    linears: tuple[str, ...]
    attentions: tuple[str, ...]


@dataclass
class ModelGraph:
    """The captured model: its FX graph plus an index of the sites passes care about."""

    graph_module: torch.fx.GraphModule | None
    method: str  # "export" or "dynamo"
    linears: list[LinearSite] = field(default_factory=list)
    attentions: list[AttentionSite] = field(default_factory=list)
    blocks: list[BlockSite] = field(default_factory=list)
    block_graph: nx.DiGraph = field(default_factory=nx.DiGraph)
    symbols: dict[str, str] = field(default_factory=dict)  # symbolic dim -> "B" / "S"
    notes: list[str] = field(default_factory=list)  # why export fell back, which dims stayed static, ...
    num_params: int = 0
    param_bytes: int = 0
    model_kind: str = "generic"
    example_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    modules: dict[str, str] = field(default_factory=dict)  # module path -> class name, for modules that ran
    context: int | None = None  # the context length the user plans to serve (`optimize(context=...)`)
    model_class: str = ""  # class name of the captured model (passes refuse classes they cannot drive by name)

    @property
    def estimate_shape(self) -> tuple[int, int, int]:
        """(batch, new tokens, context) that candidate estimates and the report's latency are made at:
        one decode step (batch 1, one token) for causal LMs at the stated context (else the example's length),
        the example input's shape otherwise."""
        shape = next(iter(self.example_shapes.values()), (1, 1))
        b, s = (int(shape[0]), int(shape[1])) if len(shape) >= 2 else (1, 1)
        return (1, 1, self.context or s) if self.model_kind == "causal_lm" else (b, s, s)

    @property
    def example_tokens(self) -> int:
        b, s, _ = self.estimate_shape
        return b * s

    def linear(self, name: str) -> LinearSite:
        for site in self.linears:
            if site.name == name:
                return site
        raise KeyError(f"no linear site named {name!r}")

    def residual_chain(self) -> list[str]:
        """Blocks in dataflow order (topological order of the block graph)."""
        order = [n for n in nx.topological_sort(self.block_graph) if n in {b.name for b in self.blocks}]
        return order

    def summary(self) -> dict[str, Any]:
        gqa = sorted({(a.num_heads, a.num_kv_heads) for a in self.attentions})
        return {
            "method": self.method,
            "model_kind": self.model_kind,
            "linears": len(self.linears),
            "attentions": len(self.attentions),
            "blocks": len(self.blocks),
            "heads (q, kv)": gqa,
            "params": self.num_params,
            "symbols": self.symbols,
            "notes": list(self.notes),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "linear_sites": [asdict(s) for s in self.linears],
            "attention_sites": [asdict(s) for s in self.attentions],
            "block_sites": [asdict(s) for s in self.blocks],
        }
