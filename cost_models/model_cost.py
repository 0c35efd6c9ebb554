"""Whole-model cost as one sympy expression over the captured sites, and the `RewriteEstimate` of a rewrite.

The forward's time is the sum of its linears (per weight scheme), fused attentions (S new tokens over S_ctx
positions) and the remaining FX ops (dispatch + boundary bytes, from each node's symbolic output shape),
plus the Python cost of the non-linear module calls. `overrides` maps linear site names to the weight scheme
a plan gives them, so "after" is the same formula with different terms. Expressions are lambdified once per
(graph, target, overrides).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import sympy as sp

from optpass.cost_models import formulas as F
from optpass.cost_models.estimate import RewriteEstimate
from optpass.cost_models.hardware import HardwareSpec
from optpass.sites import ModelGraph

# FX ops that never run in eager mode (shape asserts, symbolic sizes)
_NOT_RUN = ("_assert_tensor_metadata", "sym_size", "sym_numel", "_assert_scalar")
_VIEWS = ("view", "reshape", "unsqueeze", "squeeze", "expand", "transpose", "slice", "alias", "permute", "select",
          "t.default", "detach")
Overrides = dict[str, str]  # linear site name -> scheme key ("int8", "int4_g64", ...); ATTENTION -> lowering
ATTENTION = "attention"  # the override key of the causal attentions' lowering
PREFILL_KERNEL = "bf16_prefill_kernel"  # long causal prefills on optpass's bf16 kernel (`formulas.prefill_kernel_time`)


def _quantize_effects(cand: Any) -> Overrides:
    out = {s: F.scheme_key(cand.params["scheme"], cand.params.get("group_size")) for s in cand.sites}
    if cand.params.get("prefill_attention"):  # quantized blocks also move long prefills to the bf16 kernel
        out[ATTENTION] = PREFILL_KERNEL
    return out


# pass name -> the linear schemes its candidate gives each site (passes with other effects register theirs)
EFFECTS: dict[str, Callable[[Any], Overrides]] = {"quantize": _quantize_effects}


def overrides_for(candidates: list[Any]) -> Overrides:
    """Combined linear-scheme overrides of several candidates (later ones win on a shared site)."""
    out: Overrides = {}
    for cand in candidates:
        if cand.pass_name in EFFECTS:
            out.update(EFFECTS[cand.pass_name](cand))
    return out


def _dim(d: Any, symbols: dict[str, sp.Symbol]) -> sp.Expr:
    try:
        expr = sp.sympify(str(d), locals=symbols)
    except (sp.SympifyError, TypeError, SyntaxError):
        return sp.Integer(1)
    return expr.subs({s: 1 for s in expr.free_symbols if s not in symbols.values()})


def glue(graph: ModelGraph) -> tuple[int, sp.Expr]:
    """(ops that dispatch, summed output elements of the ones that move data) for every FX op that is not a
    linear or an attention: norms, RoPE, activations, residual adds, casts."""
    cache = graph.__dict__.setdefault("_glue_cache", {})
    if "glue" in cache:
        return cache["glue"]
    symbols = {name: F.SYMBOLS[role] for name, role in graph.symbols.items() if role in F.SYMBOLS}
    ops, numel = 0, sp.Integer(0)
    gm = graph.graph_module
    for node in gm.graph.nodes if gm is not None else []:
        target = str(node.target)
        if node.op != "call_function" or any(k in target for k in _NOT_RUN):
            continue
        if "linear" in target or "scaled_dot_product" in target:
            continue
        ops += 1
        val = node.meta.get("val")
        if hasattr(val, "shape") and not any(k in target for k in _VIEWS):
            numel += sp.Mul(*[_dim(d, symbols) for d in val.shape])
    cache["glue"] = (ops, numel)
    return cache["glue"]


def forward_terms(graph: ModelGraph, spec: HardwareSpec, overrides: Overrides | None = None) -> dict[str, sp.Expr]:
    """Seconds per forward by term ("linear <scheme> <n>x<k>", "attention", "glue ops", "module calls")."""
    overrides = overrides or {}
    shapes = Counter((overrides.get(s.name, "fp32"), s.out_features, s.in_features) for s in graph.linears)
    terms = {f"linear {sch} {n}x{k}": count * F.linear_time(spec, sch, n, k) for (sch, n, k), count in shapes.items()}
    heads = Counter((a.num_heads, a.num_kv_heads, a.head_dim, a.causal) for a in graph.attentions)
    kernel = overrides.get(ATTENTION) == PREFILL_KERNEL
    if heads:
        terms["attention"] = F.total(
            c * (F.prefill_kernel_time(spec, h, kv, d) if kernel and causal else F.sdpa_time(spec, h, kv, d, causal))
            for (h, kv, d, causal), c in heads.items())
    ops, numel = glue(graph)
    if ops:
        terms["glue ops"] = ops * spec.launch_floor + F.elementwise_time(spec, numel) - (
            spec.launch_floor if spec.launch_additive else 0)
    others = sum(1 for cls in graph.modules.values() if cls not in ("Linear",))
    if others and spec.module_floor:
        terms["module calls"] = sp.Float(others * spec.module_floor)
    return terms


def forward_expr(graph: ModelGraph, spec: HardwareSpec, overrides: Overrides | None = None) -> sp.Expr:
    """The forward's seconds as one expression in B, S, S_ctx (memoised per graph, target and overrides)."""
    cache = graph.__dict__.setdefault("_expr_cache", {})
    key = (spec.name, spec.calibrated, id(spec.linear), tuple(sorted((overrides or {}).items())))
    if key not in cache:
        cache[key] = F.total(forward_terms(graph, spec, overrides).values())
    return cache[key]


def _compiled(graph: ModelGraph, spec: HardwareSpec, overrides: Overrides | None) -> Callable[..., float]:
    cache = graph.__dict__.setdefault("_cost_cache", {})
    key = (spec.name, spec.calibrated, id(spec.linear), tuple(sorted((overrides or {}).items())))
    if key not in cache:
        cache[key] = sp.lambdify((F.B, F.S, F.S_ctx), forward_expr(graph, spec, overrides), "math")
    return cache[key]


def predict_forward(graph: ModelGraph, spec: HardwareSpec, batch: int, seq: int, context: int | None = None,
                    overrides: Overrides | None = None) -> float:
    """Seconds for one forward over `batch x seq` new tokens attending to `context` positions."""
    return float(_compiled(graph, spec, overrides)(batch, seq, context or seq))


def peak_memory_expr(graph: ModelGraph, overrides: Overrides | None = None, kv_bytes: int = 4) -> sp.Expr:
    """Weights (linears at their scheme, the rest as captured) + KV cache + the largest live activations."""
    overrides = overrides or {}
    # a tied head's table counts once (in param_bytes); quantized, it is replaced (the embedding reads its rows)
    counted = [s for s in graph.linears if not s.tied_to or s.name in overrides]
    linear_fp32 = sum(F.weight_bytes_value("fp32", s.out_features, s.in_features) for s in counted)
    linear_now = sum(F.weight_bytes_value(overrides.get(s.name, "fp32"), s.out_features, s.in_features)
                     for s in counted)
    weights = graph.param_bytes - linear_fp32 + linear_now
    kv = F.total(F.kv_read_bytes(1, a.num_kv_heads, a.head_dim, kv_bytes) for a in graph.attentions)
    widest = max([s.out_features for s in graph.linears] or [1])
    return F.peak_memory(weights, kv, 2 * 4 * F.B * F.S * widest)


def rewrite_estimate(graph: ModelGraph, spec: HardwareSpec, overrides: Overrides, d_memory: float = 0.0,
                     max_seq: int = 8192) -> RewriteEstimate:
    """Before / after at the graph's estimate shape, and the prefill length (B=1) where the sign of the gain
    flips (the crossover), found on the symbolic difference."""
    b, s, ctx = graph.estimate_shape
    before = predict_forward(graph, spec, b, s, ctx)
    after = predict_forward(graph, spec, b, s, ctx, overrides)
    f_before, f_after = _compiled(graph, spec, None), _compiled(graph, spec, overrides)
    cross = F.sign_change(lambda x: f_after(1, x, x) - f_before(1, x, x), hi=max_seq)  # prefill, B=1, S_ctx=S
    return RewriteEstimate(before, after, d_memory, cross, tokens=graph.example_tokens)


def baseline_latency(graph: ModelGraph, spec: HardwareSpec) -> float:
    """Predicted forward time at the graph's estimate shape."""
    b, s, ctx = graph.estimate_shape
    return predict_forward(graph, spec, b, s, ctx)


def model_estimate(graph: ModelGraph, spec: HardwareSpec, d_latency: float, d_memory: float = 0.0,
                   crossover: float | None = None) -> RewriteEstimate:
    """A whole-model `RewriteEstimate` from a rewrite's latency / memory deltas at the example shape (for
    passes whose effect is not yet a formula over sites)."""
    before = baseline_latency(graph, spec)
    return RewriteEstimate(before, before + d_latency, d_memory, crossover, tokens=graph.example_tokens)
