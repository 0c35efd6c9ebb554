"""DiT block caching across denoising steps, calibrated automatically to a quality budget.

The repeated transformer blocks found in the captured graph (`BlockSite`s) are wrapped by a
`CachedBlockStack` (passes/dit_caching/stack.py) that, per denoising step, runs the middle blocks or
reuses / forecasts their residual [B, tokens, hidden]. `apply` picks the policy and threshold itself:
it samples the model's full denoising loop (DDIM, `optpass.sampling`) on calibration seeds, searches
policies x thresholds for the fewest computed block-steps whose final images stay within the budget
(min PSNR or max rel-L2 vs the uncached images), and checks the winner on held-out seeds
(FORA, Delta-DiT, First-Block-Cache / DBCache, TeaCache, TaylorSeer; see the policy modules).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optpass.cost_models.dit_cache import dit_cache_estimate, predicted_speedup
from optpass.cost_models.hardware import HardwareSpec
from optpass.cost_models.model_cost import baseline_latency
from optpass.errors import ConfigError
from optpass.pass_base import ApplyContext, Candidate, Pass, PassConfig, PassResult
from optpass.passes.dit_caching import POLICIES, cache_controller, install_block_cache, make_policy
from optpass.passes.dit_caching.calibrate import calibrate
from optpass.quality import QualityBudget
from optpass.registry import register_pass
from optpass.sampling import ddim_sample
from optpass.sites import ModelGraph

DEFAULT_POLICIES = ("fixed_interval", "first_block", "teacache", "taylorseer", "taylorseer_gated")
# models the built-in sampler can denoise (latents + timestep + optional class label, no text conditioning)
DEFAULT_SAMPLER_CLASSES = ("DiTTransformer2DModel",)
SampleFn = Callable[[nn.Module, Sequence[int]], torch.Tensor]


@dataclass(frozen=True)
class DitCacheConfig(PassConfig):
    steps: int = 50  # denoising steps of the schedule the cache is calibrated for
    policies: tuple[str, ...] = DEFAULT_POLICIES
    calibration_seeds: tuple[int, ...] = (0, 1, 2, 3)
    holdout_seeds: tuple[int, ...] = (1000, 1001, 1002, 1003, 1004, 1005)
    min_steps: int = 10  # fewer steps (distilled schedules): neighbouring steps differ too much to cache
    min_psnr: float | None = None  # overrides the run's quality budget when set
    max_rel_l2: float | None = None
    margin_db: float = 1.0  # calibration must beat the budget by this much before the held-out check
    warmup: int = 2  # first steps always computed
    max_skip: int = 12  # most consecutive skipped steps
    stack: str = ""  # module path of the block list; "" = from the captured graph's BlockSites
    expected_fraction: float = 0.3  # prior for the plan's estimate, before calibration measures it
    guidance_scale: float = 1.0  # classifier-free guidance of the default sampler (DiTPipeline-style), 1 = off

    def __post_init__(self) -> None:
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown or not self.policies:
            raise ConfigError(f"DitCacheConfig.policies={self.policies}; registered: {sorted(POLICIES)}")
        if self.steps < 1 or self.min_steps < 1:
            raise ConfigError(f"DitCacheConfig.steps={self.steps} and min_steps={self.min_steps} must be >= 1")
        if not self.calibration_seeds or not self.holdout_seeds or set(self.calibration_seeds) & set(self.holdout_seeds):
            raise ConfigError("DitCacheConfig: calibration_seeds and holdout_seeds must be non-empty and disjoint")
        if not 0 < self.expected_fraction <= 1:
            raise ConfigError(f"DitCacheConfig.expected_fraction={self.expected_fraction}; allowed (0, 1]")
        if self.margin_db < 0 or self.warmup < 1 or self.max_skip < 0:
            raise ConfigError(f"DitCacheConfig: margin_db={self.margin_db} >= 0, warmup={self.warmup} >= 1, "
                              f"max_skip={self.max_skip} >= 0 required")


def find_stack(graph: ModelGraph) -> tuple[str, int] | None:
    """The module path of the longest run of repeated blocks (`transformer_blocks`, `blocks`) and its length."""
    groups: dict[str, int] = defaultdict(int)
    for site in graph.blocks:
        parent, _, index = site.name.rpartition(".")
        if index.isdigit():
            groups[parent] += 1
    if not groups:
        return None
    path = max(groups, key=groups.get)
    return path, groups[path]


def _tokens_hidden(graph: ModelGraph) -> tuple[int, int]:
    hidden = next((s.in_features for s in graph.linears if s.block is not None), 1)
    att = next(iter(graph.attentions), None)
    tokens = int(att.q_shape[2]) if att is not None and str(att.q_shape[2]).isdigit() else 1
    return tokens, hidden


@register_pass
class DitCachePass(Pass):
    """Cache DiT blocks across denoising steps; policy and threshold calibrated to the quality budget."""

    name = "dit_cache"
    config_cls = DitCacheConfig
    needs_calibration = True

    def __init__(self, config: DitCacheConfig | None = None, sampler: SampleFn | None = None) -> None:
        super().__init__(config)
        self.sampler = sampler  # (model, seeds) -> final images; default: DDIM on `steps`, labels = seed % classes

    def candidates(self, graph: ModelGraph, target: HardwareSpec) -> list[Candidate]:
        cfg: DitCacheConfig = self.config  # type: ignore[assignment]
        if graph.model_kind != "diffusion_transformer" and self.sampler is None:
            return [Candidate.skip(self.name, (), f"a {graph.model_kind} model has no denoising loop to cache across; "
                                   "for a plain PyTorch DiT pass DitCachePass(config, sampler=...)")]
        if self.sampler is None and graph.model_class not in DEFAULT_SAMPLER_CLASSES:
            return [Candidate.skip(self.name, (), f"the built-in sampler drives {', '.join(DEFAULT_SAMPLER_CLASSES)} "
                                   f"(class-conditional latents); {graph.model_class or 'this model'} needs its pipeline's "
                                   "conditioning, so pass DitCachePass(config, sampler=...) to calibrate on it")]
        found = (cfg.stack, 0) if cfg.stack else find_stack(graph)
        if found is None:
            return [Candidate.skip(self.name, (), "no repeated block stack (BlockSites) in the captured graph")]
        path, count = found
        sites = tuple(s.name for s in graph.blocks if s.name.startswith(path + "."))
        count = count or len(sites)
        if cfg.steps < cfg.min_steps:
            return [Candidate.skip(self.name, sites, refusal_few_steps(cfg), label="dit cache")]
        if count < 2:
            return [Candidate.skip(self.name, sites, f"{path} has {count} block(s); caching needs at least 2")]
        tokens, hidden = _tokens_hidden(graph)
        b = graph.estimate_shape[0]
        est = dit_cache_estimate(graph, target, baseline_latency(graph, target), count - 1, cfg.expected_fraction,
                                 4.0 * b * tokens * hidden)
        return [Candidate(self.name, sites, {"stack": path, "num_blocks": count, "steps": cfg.steps}, est,
                          label="dit cache", paths=("module",))]

    def _budget(self, context: ApplyContext) -> QualityBudget:
        cfg: DitCacheConfig = self.config  # type: ignore[assignment]
        if cfg.min_psnr is not None or cfg.max_rel_l2 is not None:
            return QualityBudget(min_psnr=cfg.min_psnr, max_rel_l2=cfg.max_rel_l2)
        budget = getattr(context.guard, "budget", None)
        if budget is not None and (budget.min_psnr is not None or budget.max_rel_l2 is not None):
            return QualityBudget(min_psnr=budget.min_psnr, max_rel_l2=budget.max_rel_l2)
        return QualityBudget(min_psnr=30.0)

    def sample_fn(self, model: nn.Module) -> SampleFn:
        if self.sampler is not None:
            return self.sampler
        steps, scale = self.config.steps, self.config.guidance_scale  # type: ignore[attr-defined]
        classes = getattr(getattr(model, "config", None), "num_embeds_ada_norm", None)
        return lambda m, seeds: ddim_sample(m, seeds, [s % classes for s in seeds] if classes else None, steps,
                                            guidance_scale=scale if classes else 1.0)

    def apply(self, model: nn.Module, chosen: list[Candidate], context: ApplyContext) -> PassResult:
        cfg: DitCacheConfig = self.config  # type: ignore[assignment]
        if cfg.steps < cfg.min_steps:
            return PassResult(self.name, model, False, reason=refusal_few_steps(cfg))
        cand = chosen[0]
        path = cand.params["stack"]
        sample, budget = self.sample_fn(model), self._budget(context)
        start = time.perf_counter()
        result = calibrate(model, path, sample, budget, cfg.calibration_seeds, cfg.holdout_seeds,
                                     cfg.policies, cfg.warmup, cfg.max_skip, cfg.margin_db)
        details: dict[str, Any] = {"calibration": result.to_dict(), "budget": budget.to_dict(), "steps": cfg.steps,
                                   "calibration_seconds": time.perf_counter() - start}
        if result.chosen is None:
            return PassResult(self.name, model, False, cand.sites, reason=f"dit_cache refused: {result.reason}",
                              details=details)
        controller = cache_controller(model)
        fraction = result.holdout["computed_fraction"]
        cached_blocks = controller.num_blocks - controller.n_first - controller.n_last
        middle_fraction = (fraction * controller.num_blocks - controller.n_first - controller.n_last) / max(cached_blocks, 1)
        if context.graph is not None:
            tokens, hidden = _tokens_hidden(context.graph)
            est = dit_cache_estimate(context.graph, context.target, baseline_latency(context.graph, context.target),
                                     cached_blocks, middle_fraction, 4.0 * len(cfg.holdout_seeds) * tokens * hidden,
                                     history=getattr(controller.policy, "order", 0) + 1)
            details["predicted_speedup"] = predicted_speedup(est)
        details.update({"policy": result.chosen.policy, "label": result.chosen.label,
                        "computed_fraction": fraction, "holdout_psnr": result.holdout.get("psnr"),
                        "calibration_psnr": result.calibration.get("psnr")})
        return PassResult(self.name, model, True, cand.sites, details=details)

    def saved_state(self, model: nn.Module) -> dict[str, Any]:
        found = getattr(model, "_optpass_dit_cache", None)
        if not found:
            return {}
        path, ctl = found
        if ctl.policy is None:
            return {}
        return {"stack": path, "policy": ctl.policy.name, "params": ctl.policy.params(), "n_first": ctl.n_first,
                "n_last": ctl.n_last, "timestep_arg": ctl.timestep_arg}

    def restore(self, model: nn.Module, state: dict[str, Any]) -> nn.Module:
        if state:
            install_block_cache(model, state["stack"], make_policy(state["policy"], **state["params"]),
                                state["n_first"], state["n_last"], state["timestep_arg"])
        return model


def refusal_few_steps(cfg: DitCacheConfig) -> str:
    return (f"dit_cache refused: a {cfg.steps}-step schedule is below min_steps={cfg.min_steps}; few-step "
            "(distilled) samplers change the features too much between neighbouring steps for a cache to reuse, "
            "and each skipped step is a large share of the work")
