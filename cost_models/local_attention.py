"""Cost of full-attention layers made local (sinks + sliding window, `linear_attention` pass) at decode: each
converted layer's cache holds and each step reads min(S_ctx, sink + window) tokens instead of S_ctx, so the gain
starts at the window's length and grows with the context."""

from __future__ import annotations

import sympy as sp

from optpass.cost_models import formulas as F
from optpass.cost_models.estimate import RewriteEstimate
from optpass.cost_models.hardware import HardwareSpec
from optpass.sites import ModelGraph


def local_kv_bytes(graph: ModelGraph, local_layers: int, span: int, model_bytes: int = 4) -> sp.Expr:
    """KV bytes (allocated, and read per decode step) with `local_layers` of the layers keeping `span` tokens."""
    att = graph.attentions
    heads, dim = att[0].num_kv_heads, att[0].head_dim
    full = F.kv_read_bytes(len(att) - local_layers, heads, dim, model_bytes)
    return full + F.kv_read_bytes(local_layers, heads, dim, model_bytes, ctx=sp.Min(F.S_ctx, span))


def local_estimate(graph: ModelGraph, spec: HardwareSpec, local_layers: int, span: int,
                   context: int) -> RewriteEstimate:
    """Decode-step latency and KV memory at `context`, before / after `local_layers` layers keep `span` tokens."""
    from optpass.cost_models.model_cost import predict_forward

    step = predict_forward(graph, spec, 1, 1, context)
    before, after = local_kv_bytes(graph, 0, span), local_kv_bytes(graph, local_layers, span)
    at = {F.B: 1, F.S_ctx: context}
    d_time = F.evaluate((F.memory_time(spec, after) - F.memory_time(spec, before)).subs(at))
    d_mem = F.evaluate((after - before).subs(at))
    return RewriteEstimate(step, step + d_time, d_mem, float(span) if context > span else None, tokens=1)
