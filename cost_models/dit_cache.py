"""Cost of DiT block caching: per denoising step, the cached blocks run only a fraction of the steps.

    step time after = non-block time + block time x (always-run share + cached share x computed fraction)
                      + residual traffic (write the cached residual when computing, read it when reusing)

Block time is the model's forward time times the share of linear FLOPs that sit in the repeated blocks
(attention sits there too, so this slightly undercounts blocks and so the gain: a conservative estimate).
A small function so the sympy cost model (formulas.py) can port it as one more term.
"""

from __future__ import annotations

from optpass.cost_models.estimate import RewriteEstimate
from optpass.cost_models.hardware import HardwareSpec
from optpass.sites import ModelGraph


def block_share(graph: ModelGraph) -> float:
    """Fraction of the forward's linear FLOPs inside repeated blocks (0 when there are no blocks)."""
    total = sum(s.weight_numel for s in graph.linears)
    inside = sum(s.weight_numel for s in graph.linears if s.block is not None)
    return inside / total if total else 0.0


def cached_step_seconds(forward_s: float, share: float, cached_blocks: int, num_blocks: int,
                        computed_fraction: float, residual_bytes: float, spec: HardwareSpec, history: int = 1) -> float:
    """Predicted seconds of one denoising step with caching (averaged over the steps of a generation).

    `computed_fraction` is of the cached blocks' steps; a computed step writes the residual once, a skipped
    step reads `history` residuals (1 to reuse, order + 1 to forecast)."""
    blocks_s = forward_s * share
    cached_s = blocks_s * cached_blocks / max(num_blocks, 1)
    moved = residual_bytes * (computed_fraction + (1 - computed_fraction) * history)
    traffic = moved / (spec.mem_bandwidth * spec.efficiency.get("memory", 0.8))
    return forward_s - cached_s * (1 - computed_fraction) + traffic


def dit_cache_estimate(graph: ModelGraph, spec: HardwareSpec, forward_s: float, cached_blocks: int,
                       computed_fraction: float, residual_bytes: float, history: int = 1) -> RewriteEstimate:
    """`RewriteEstimate` per denoising step; `d_peak_memory` is the residual history kept alive."""
    num_blocks = len(graph.blocks)
    after = cached_step_seconds(forward_s, block_share(graph), cached_blocks, num_blocks, computed_fraction,
                                residual_bytes, spec, history)
    return RewriteEstimate(forward_s, after, residual_bytes * history, None, tokens=graph.example_tokens)


def predicted_speedup(estimate: RewriteEstimate) -> float:
    return estimate.before / estimate.after if estimate.after > 0 else 1.0
