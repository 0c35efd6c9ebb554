"""Whole-model roofline prediction at a concrete shape, from the captured sites."""

from __future__ import annotations

from optpass.cost_models.estimate import RewriteEstimate, op_time
from optpass.cost_models.quantization import linear_seconds
from optpass.cost_models.hardware import HardwareSpec
from optpass.sites import ModelGraph

# Non-GEMM ops per block (norms, RoPE, activations, residual adds, reshapes) that each pay a dispatch.
_GLUE_OPS_PER_BLOCK = 30


def predict_forward(graph: ModelGraph, spec: HardwareSpec, batch: int, seq: int, context: int | None = None) -> float:
    """Seconds for one forward over `batch x seq` new tokens attending to `context` positions."""
    tokens = batch * seq
    context = context or seq
    total = 0.0
    for site in graph.linears:
        total += linear_seconds(site, "fp32", tokens, spec)
    for att in graph.attentions:
        flops = 4.0 * batch * att.num_heads * seq * context * att.head_dim * (0.5 if att.causal and seq > 1 else 1.0)
        kv_bytes = 2.0 * batch * att.num_kv_heads * context * att.head_dim * 4
        total += op_time(flops, kv_bytes, spec, "fp32", "attention")
    total += max(len(graph.blocks), 1) * _GLUE_OPS_PER_BLOCK * spec.launch_floor
    return total


def baseline_latency(graph: ModelGraph, spec: HardwareSpec) -> float:
    """Predicted forward time at the graph's estimate shape (cached per graph and target)."""
    cache = graph.__dict__.setdefault("_baseline_cache", {})
    if spec.name not in cache:
        b, s, ctx = graph.estimate_shape
        cache[spec.name] = predict_forward(graph, spec, b, s, ctx)
    return cache[spec.name]


def model_estimate(graph: ModelGraph, spec: HardwareSpec, d_latency: float, d_memory: float = 0.0,
                   crossover: float | None = None) -> RewriteEstimate:
    """A whole-model `RewriteEstimate` from a rewrite's latency / memory deltas at the example shape."""
    before = baseline_latency(graph, spec)
    return RewriteEstimate(before, before + d_latency, d_memory, crossover, tokens=graph.example_tokens)
