"""Cost of a compressed KV cache at decode: the K/V bytes each step reads and the cache's allocated bytes, as
sympy expressions in the context length S_ctx, so `auto` enables compression only where it pays (long
context, memory pressure) and the plan can show the crossover context length."""

from __future__ import annotations

import sympy as sp

from optpass.cost_models import formulas as F
from optpass.cost_models.estimate import RewriteEstimate
from optpass.cost_models.hardware import HardwareSpec
from optpass.sites import ModelGraph

# per kept token and KV head, besides K and V: value scale (fp32), score (fp32), age (int32)
SLOT_OVERHEAD_BYTES = 12
# fused kernels a compiled compressed decode step adds per layer (window move, eviction argmin, scatters, scores)
EXTRA_OPS_PER_LAYER = 6


def _shape(graph: ModelGraph) -> tuple[int, int, int]:
    att = graph.attentions
    return len(att), att[0].num_kv_heads, att[0].head_dim


def kv_bytes(graph: ModelGraph, keep: float | sp.Expr, bits: int | None, window: int = 0, model_bytes: int = 4,
             ctx: sp.Expr = F.S_ctx, batch: sp.Expr = F.B) -> sp.Expr:
    """Bytes of the KV cache (allocated, and read by each decode step) at context `ctx`."""
    layers, heads, dim = _shape(graph)
    if bits is None and keep == 1:
        return F.kv_read_bytes(layers, heads, dim, model_bytes, 1, batch, ctx)
    elem = model_bytes if bits is None else bits / 8
    slots = F.kv_read_bytes(layers, heads, dim, elem, keep, batch, ctx) + \
        layers * batch * heads * keep * ctx * SLOT_OVERHEAD_BYTES
    return slots + F.kv_read_bytes(layers, heads, dim, model_bytes, 1, batch, window)


def decode_kv_time(graph: ModelGraph, spec: HardwareSpec, keep: float, bits: int | None, window: int = 0) -> sp.Expr:
    """Seconds a decode step spends reading the cache (plus the eviction work when compressed)."""
    layers = len(graph.attentions)
    extra = 0 if (bits is None and keep == 1) else layers * EXTRA_OPS_PER_LAYER
    return F.memory_time(spec, kv_bytes(graph, keep, bits, window), ops=max(extra, 1))


def kv_estimate(graph: ModelGraph, spec: HardwareSpec, keep: float, bits: int | None, window: int,
                context: int) -> RewriteEstimate:
    """Decode-step latency and KV memory before / after compression at `context`, with the crossover context."""
    from optpass.cost_models.model_cost import predict_forward

    step = predict_forward(graph, spec, 1, 1, context)
    full = decode_kv_time(graph, spec, 1, None)
    compressed = decode_kv_time(graph, spec, keep, bits, window)
    at = {F.B: 1, F.S_ctx: context}
    d_time = F.evaluate((compressed - full).subs(at))
    d_mem = F.evaluate((kv_bytes(graph, keep, bits, window) - kv_bytes(graph, 1, None)).subs(at))
    cross = F.crossover((compressed - full).subs({F.B: 1}), F.S_ctx, lo=16, hi=131072)
    return RewriteEstimate(step, step + d_time, d_mem, cross, tokens=1)
