"""Cost of block-sparse prefill attention: per layer, dense SDPA vs the layout at density rho(S), the prefill
length from which the layer pays (its crossover), and the whole-prefill estimate a candidate carries."""

from __future__ import annotations

from collections.abc import Callable

from optpass.cost_models import formulas as F
from optpass.cost_models.estimate import RewriteEstimate
from optpass.cost_models.hardware import HardwareSpec
from optpass.sites import AttentionSite, ModelGraph

MAX_SEQ = 131072
# a block-sparse call's fixed work on CPU beyond the kernel, for uncalibrated specs: block indices, the BlockMask, the
# compiled FlexAttention dispatch; measured at 1.4-1.7 ms per layer call at 128-256 tokens on a 2-core AVX-512 EPYC
# (SDPA there: 0.3-1 ms). A calibrated spec times the lowering this machine runs (`sparse_call_floor`).
CPU_CALL_FLOOR = 1.5e-3


def attention_pair(site: AttentionSite, spec: HardwareSpec, seq: int, rho: float, block: int,
                   choosing: float = 0.0, causal: bool = True, batch: int = 1) -> tuple[float, float]:
    """(dense SDPA, block-sparse) seconds of one attention call over `seq` tokens (a causal prefill, or
    bidirectional image tokens); `choosing` is the online block choice's work as a share of dense SDPA's time."""
    at = {F.B: batch, F.S: seq, F.S_ctx: seq}
    dense = F.evaluate(F.sdpa_time(spec, site.num_heads, site.num_kv_heads, site.head_dim, causal).subs(at))
    sparse = F.evaluate(F.sparse_attention_time(spec, site.num_heads, site.num_kv_heads, site.head_dim, min(rho, 1.0),
                                                block, causal).subs(at))
    floor = 0.0
    if spec.kind == "cpu":
        floor = spec.sparse_call_floor if spec.sparse_call_floor is not None else CPU_CALL_FLOOR
    return dense, sparse + choosing * dense + floor


def layer_crossover(site: AttentionSite, spec: HardwareSpec, rho_at: Callable[[int], tuple[float, float]], block: int,
                    band: float) -> int | None:
    """Shortest prefill from which sparse attention beats dense by more than `band`, or None (never, up to
    MAX_SEQ). `rho_at(S)` gives (density, online choice work) at length S: a fixed window covers less of a
    longer prompt."""
    def pays(seq: float) -> float:
        s = max(int(seq), 2 * block)
        rho, choosing = rho_at(s)
        dense, sparse = attention_pair(site, spec, s, rho, block, choosing)
        return sparse - dense * (1 - band)

    if pays(MAX_SEQ) >= 0:
        return None
    cross = F.sign_change(pays, lo=2 * block, hi=MAX_SEQ)
    return int(cross) if cross is not None else 2 * block


def prefill_estimate(graph: ModelGraph, spec: HardwareSpec, rho: float, context: int, block: int) -> RewriteEstimate:
    """A prefill of `context` tokens (batch 1) with every attention at density `rho`."""
    from optpass.cost_models.model_cost import predict_forward

    before = predict_forward(graph, spec, 1, context, context)
    saved = 0.0
    for site in graph.attentions:
        dense, sparse = attention_pair(site, spec, context, rho, block)
        saved += dense - sparse
    cross = layer_crossover(graph.attentions[0], spec, lambda s: (rho, 0.0), block, 0.0) if graph.attentions else None
    return RewriteEstimate(before, before - saved, 0.0, cross, tokens=context)


def image_attention(graph: ModelGraph) -> tuple[list[AttentionSite], int, int] | None:
    """(the bidirectional unmasked self-attention sites, batch, tokens) the capture saw; None when there are none or
    their captured shapes do not give the token count."""
    sites = [a for a in graph.attentions if not a.causal and not a.has_mask and a.q_shape[2:3] == a.k_shape[2:3]]
    try:
        return sites, int(sites[0].q_shape[0]), int(sites[0].q_shape[2])
    except (IndexError, ValueError):
        return None


def image_estimate(graph: ModelGraph, spec: HardwareSpec, rho: float, block: int) -> RewriteEstimate | None:
    """A diffusion transformer's forward at its captured batch and image-token count with every bidirectional
    self-attention at density `rho`; None without such attention (`image_attention`)."""
    from optpass.cost_models.model_cost import predict_forward

    captured = image_attention(graph)
    if captured is None:
        return None
    sites, batch, tokens = captured
    before = predict_forward(graph, spec, batch, tokens, tokens)
    saved = 0.0
    for site in sites:
        dense, sparse = attention_pair(site, spec, tokens, rho, block, causal=False, batch=batch)
        saved += dense - sparse
    return RewriteEstimate(before, before - saved, 0.0, None, tokens=batch * tokens)
