"""The sparse_attention pass on diffusion transformers: a 2D-local window over the image tokens (`local_2d`).

An image token's self-attention mass concentrates on its spatial neighbours (the observation behind sliding-tile
attention and GRAT), so each query block attends only the key blocks within `radius` rows and columns. The radius
is a decision under the quality budget (the smallest first, each scored with sparse attention forced on at the
model's own resolution); the speed side is the cost model's estimate checked by timing the layout against dense
SDPA on the model's attention shape, and the pass keeps attention dense, with both figures, when it does not pay.
Installed through diffusers' processor API (`backends/sparse/image_attention.py`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from optpass.backends.sparse.execute import block_sparse_attention
from optpass.backends.sparse.image_attention import ImageSparsity, install_image_sparse, self_attention_modules
from optpass.backends.sparse.layout import density
from optpass.cost_models.hardware import HardwareSpec
from optpass.cost_models.sparse_attention import attention_pair, image_attention, image_estimate
from optpass.measure import interleaved_times
from optpass.pass_base import Alternatives, ApplyContext, Candidate, Option, Outcome, PassResult
from optpass.sites import AttentionSite, ModelGraph

RADIUS_SHARES = (0.125, 0.25, 0.5)  # radius as a share of the grid's longer side, most aggressive first
ASSUMED_DENSITY = 0.25  # the planning estimate's layout density, before the grid is known


def image_candidate(name: str, graph: ModelGraph, spec: HardwareSpec, block: int) -> Candidate:
    est = image_estimate(graph, spec, ASSUMED_DENSITY, block)
    if est is None:
        return Candidate.skip(name, (), "no bidirectional self-attention over image tokens was captured")
    sites = tuple(a.name for a in image_attention(graph)[0])
    label = f"2D-local image attention @ {est.tokens} tokens (planned at density {ASSUMED_DENSITY})"
    return Candidate(name, sites, {}, est, label=label, paths=("module",))


def grid_of(model: nn.Module) -> tuple[int, int] | None:
    """(rows, columns) of image tokens at the model's configured resolution (`sample_size / patch_size`)."""
    config = getattr(model, "config", None)
    size, patch = getattr(config, "sample_size", None), getattr(config, "patch_size", None)
    if not isinstance(patch, int) or patch < 1 or size is None:
        return None
    rows, cols = (size, size) if isinstance(size, int) else tuple(size)
    return rows // patch, cols // patch


def radii(grid: tuple[int, int], block: int) -> list[tuple[int, float]]:
    """(radius, block density) per distinct radius that skips at least one block, smallest first."""
    out: list[tuple[int, float]] = []
    for share in RADIUS_SHARES:
        radius = max(1, math.ceil(share * max(grid)))
        rho = float(density(ImageSparsity(radius, block).keep(*grid), causal=False)[0])
        if rho < 1.0 and all(radius != r for r, _ in out):
            out.append((radius, rho))
    return out


def measured_speedup(site: AttentionSite, plan: ImageSparsity, grid: tuple[int, int], batch: int,
                     repeats: int = 3) -> float:
    """Dense SDPA / block-sparse seconds of one attention call of the captured site's shape at `grid` (interleaved
    rounds, medians)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, site.num_heads, grid[0] * grid[1], site.head_dim, generator=g) for _ in range(3))
    keep = plan.keep(*grid)
    times = interleaved_times({  # the warm-up round compiles the sparse kernel once per process
        "dense": lambda: F.scaled_dot_product_attention(q, k, v),
        "sparse": lambda: block_sparse_attention(q, k, v, keep, plan.block, site.head_dim ** -0.5, causal=False)},
        repeats, warmup=1)
    dense, sparse = (sorted(times[n])[repeats // 2] for n in ("dense", "sparse"))
    return dense / sparse


def predicted_speedup(site: AttentionSite, spec: HardwareSpec, rho: float, block: int, tokens: int,
                      batch: int) -> float:
    dense, sparse = attention_pair(site, spec, tokens, rho, block, causal=False, batch=batch)
    return dense / sparse


def image_decisions(name: str, model: nn.Module, block: int, context: ApplyContext
                    ) -> list[Alternatives] | PassResult:
    if not self_attention_modules(model):
        return PassResult(name, model, False, reason="no diffusers attention module with a processor to route")
    grid = grid_of(model)
    if grid is None:
        return PassResult(name, model, False, reason="the model takes an already-packed token sequence (no "
                          "sample_size / patch_size): its 2D token grid is unknown")
    options = radii(grid, block)
    tokens = grid[0] * grid[1]
    if not options:
        return PassResult(name, model, False, reason=f"a {grid[0]}x{grid[1]} grid is {tokens} tokens in "
                          f"{block}-token blocks: a 2D window of any radius keeps every block, nothing to skip")
    captured = image_attention(context.graph) if context.graph else None
    if captured is None:
        return PassResult(name, model, False, reason="no bidirectional self-attention over image tokens was captured")
    site, batch = captured[0][0], captured[1]
    band = getattr(context.target, "error_band", 0.05)

    def option(radius: int, rho: float) -> Option:
        figures: dict[str, Any] = {"radius": radius, "density": round(rho, 4), "grid": list(grid)}

        def apply(m: nn.Module) -> Any:
            forced = ImageSparsity(radius, block, min_tokens=2)
            predicted = predicted_speedup(site, context.target, rho, block, tokens, batch)
            measured = measured_speedup(site, forced, grid, batch)
            figures.update(predicted_speedup=round(predicted, 3), measured_speedup=round(measured, 3))
            pays = measured * (1 - band) > 1.0
            figures["min_tokens"] = tokens if pays else tokens + 1
            undo, _ = install_image_sparse(m, ImageSparsity(radius, block, figures["min_tokens"]))
            figures["undo"] = undo
            return undo

        def measure(m: nn.Module) -> dict[str, float]:
            undo, state = install_image_sparse(m, ImageSparsity(radius, block, min_tokens=2))
            try:
                metrics = context.guard.evaluate(m)
            finally:
                undo()
            figures["routed_calls"] = state.sparse_calls
            if not state.sparse_calls:  # nothing ran sparse: quality says nothing about the layout
                metrics["finite"] = 0.0
            return metrics
        return Option(f"radius {radius} (density {rho:.2f})", apply, measure=measure, value=figures)

    return [Alternatives("radius", [option(r, rho) for r, rho in options], monotone=True)]


def image_finish(name: str, model: nn.Module, kept: dict[str, Option | None], outcomes: dict[str, list[Outcome]]
                 ) -> PassResult:
    tried = outcomes["radius"]
    details: dict[str, Any] = {"tried": [o.to_dict() for o in tried]}
    if kept["radius"] is None:
        return PassResult(name, model, False, details=details,
                          reason=f"no 2D window radius meets the quality budget ({tried[-1].why})")
    figures = {k: v for k, v in kept["radius"].value.items() if k != "undo"}
    details["layout"] = figures
    outcome = next((o for o in tried if o.label == kept["radius"].label), tried[-1])
    quality = ", ".join(f"{k} {v:.4g}" for k, v in (outcome.quality or {}).items() if k != "finite")
    if not figures.get("routed_calls"):
        return PassResult(name, model, False, details=details, reason="no attention call ran over the image grid "
                          "alone (joint text + image attention is not built): nothing ran sparse")
    grid, tokens = figures["grid"], figures["grid"][0] * figures["grid"][1]
    speed = f"measured {figures['measured_speedup']:.2f}x dense SDPA, predicted {figures['predicted_speedup']:.2f}x"
    if figures["min_tokens"] > tokens:
        kept["radius"].value["undo"]()
        return PassResult(name, model, False, details=details, reason=f"at {grid[0]}x{grid[1]} = {tokens} image "
                          f"tokens the radius-{figures['radius']} layout (density {figures['density']:.2f}; quality "
                          f"{quality}) runs at {speed}: attention stays dense")
    sites = tuple(self_attention_modules(model))
    return PassResult(name, model, True, sites, details=details, reason=f"radius {figures['radius']} at density "
                      f"{figures['density']:.2f}: {speed}")
