"""Attention substitution: long prefills of full-attention layers run block-sparse where the cost model and the
quality budget allow (diffusion transformers: a 2D-local window over image tokens, `sparse_attention_image.py`).

One calibration forward records each layer's queries and keys; per head the search (`backends/sparse/search.py`)
picks the cheapest pattern (sinks + window, block top-p, vertical-and-slash, or dense) that keeps a target share
of the exact attention mass. Per layer the cost model gives the prefill length from which the layer's layout
beats dense SDPA (`cost_models/sparse_attention.py`): shorter prefills, decode steps and verify steps stay dense.
The target coverage is a decision under the quality budget: most aggressive first, each measured by perplexity /
KL / top-1 of the last `EVAL_TAIL` tokens of long corpus windows (those that see the most context) with sparse
attention forced on, against the dense model. The plan is stored on each attention module (`optpass_sparse`) and
in the checkpoint. Patterns follow StreamingLLM / MInference (A-shape, vertical-slash) and FlexPrefill /
XAttention (block top-p with antidiagonal scoring).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optpass.backends.kv import enable_compressed_attention
from optpass.backends.kv.attention import support_reason
from optpass.backends.sparse.attend import ATTRIBUTE
from optpass.backends.sparse.image_attention import ATTRIBUTE as IMAGE_ATTRIBUTE
from optpass.backends.sparse.image_attention import ImageSparsity, install_image_sparse
from optpass.backends.sparse.patterns import PATTERNS, make_pattern
from optpass.backends.sparse.plan import LayerSparsity
from optpass.backends.sparse.search import DEFAULT_CANDIDATES, HeadScores, capture_queries_keys, choose, score_layer
from optpass.cost_models.hardware import HardwareSpec
from optpass.cost_models.sparse_attention import layer_crossover, prefill_estimate
from optpass.errors import ConfigError
from optpass.hf_compat import attention_modules, full_attention_layers
from optpass.pass_base import Alternatives, ApplyContext, Candidate, Option, Outcome, Pass, PassConfig, PassResult
from optpass.long_context import EVAL_TAIL, corpus_ids, reference_logits, tail_quality
from optpass.passes.sparse_attention_image import image_candidate, image_decisions, image_finish
from optpass.registry import register_pass
from optpass.sites import ModelGraph

AUTO_COVERAGES = (0.9, 0.95, 0.98, 0.99)  # tried most aggressive first under coverage="auto"
ASSUMED_DENSITY = 0.25  # the planning estimate's layout density, before any calibration
TIMED_LENGTHS = (1024, 2048, 4096)
FULL_DENSITY = 0.999  # a layer keeping this share of its key blocks is dense attention  # prefill lengths at which each layer's layout is timed against SDPA


@dataclass(frozen=True)
class SparseAttentionConfig(PassConfig):
    coverage: float | str = "auto"  # attention mass each head keeps; "auto": the lowest of AUTO_COVERAGES in budget
    patterns: tuple[str, ...] = ("a_shape", "block_topp", "vertical_slash")
    block: int = 64  # tokens per layout block
    calibration_len: int = 4096  # tokens of the calibration forward the search reads
    # tokens per quality window (sparse forced on, whatever the crossover); None = the planned context, at least
    # calibration_len: the budget is checked at the length the plan is for (a 4k check under-reports 8k damage)
    eval_len: int | None = None
    eval_windows: int = 1
    # prefill length the cost model plans for; None = the captured example's (short: auto then leaves attention
    # dense, since sparse attention only pays past its crossover; set e.g. 8192 for long prompts)
    context: int | None = None

    def __post_init__(self) -> None:
        if self.coverage != "auto" and not (isinstance(self.coverage, float) and 0 < self.coverage <= 1):
            raise ConfigError(f"SparseAttentionConfig.coverage={self.coverage!r}; a float in (0, 1] or 'auto'")
        unknown = sorted(set(self.patterns) - set(PATTERNS))
        if unknown or not self.patterns:
            raise ConfigError(f"SparseAttentionConfig.patterns {list(self.patterns)}: unknown {unknown}; "
                              f"known: {sorted(set(PATTERNS) - {'dense'})}")
        if self.block < 16 or self.block & (self.block - 1):
            raise ConfigError(f"SparseAttentionConfig.block={self.block}; a power of two >= 16")
        for name in ("calibration_len", "eval_len"):
            if getattr(self, name) is not None and getattr(self, name) < 2 * self.block:
                raise ConfigError(f"SparseAttentionConfig.{name}={getattr(self, name)}; at least 2 blocks "
                                  f"({2 * self.block} tokens)")
        if self.eval_windows < 1:
            raise ConfigError(f"SparseAttentionConfig.eval_windows={self.eval_windows}; at least 1")


def _on_images(context: ApplyContext) -> bool:
    """A diffusion transformer: the 2D-local image path (`sparse_attention_image.py`) decides and finishes."""
    return bool(context.graph and context.graph.model_kind == "diffusion_transformer")


def install(model: nn.Module, layers: dict[int, LayerSparsity]) -> Callable[[], None]:
    """Set each planned layer's `optpass_sparse`; returns the undo."""
    modules = attention_modules(model)
    before = {i: getattr(modules[i], ATTRIBUTE, None) for i in layers}
    for i, plan in layers.items():
        setattr(modules[i], ATTRIBUTE, plan)

    def undo() -> None:
        for i, plan in before.items():
            if plan is None:
                delattr(modules[i], ATTRIBUTE)
            else:
                setattr(modules[i], ATTRIBUTE, plan)
    return undo


def _density_at(specs: list[dict[str, Any]], measured: list[float], block: int) -> Callable[[int], tuple[float, float]]:
    """(layer density, online block-choice work) at prefill length S: static patterns are evaluated at S, online
    ones keep the share measured at calibration length."""
    patterns = [make_pattern(s) for s in specs]

    def rho(seq: int) -> tuple[float, float]:
        from optpass.backends.sparse.layout import clip_causal, density

        probe = torch.empty(1, 1, seq, 1)
        kept = choosing = 0.0
        for pattern, dens in zip(patterns, measured):
            if pattern.online:
                kept, choosing = kept + dens, choosing + pattern.estimation_cost(block)
            else:
                kept += float(density(clip_causal(pattern.block_mask(probe, probe, block)))[0])
        return kept / len(patterns), choosing / len(patterns)
    return rho


def _empty_plan_reason(label: str, summary: dict[str, Any]) -> str:
    """Why the kept option planned no layer. At a high coverage every head may keep all its key blocks (a layout
    of density 1 is dense attention under another name), which a report must not pass off as a missing crossover."""
    full = sorted(int(i) for i, row in summary.items() if row["density"] >= FULL_DENSITY)
    if full and len(full) == len(summary):
        return (f"{label} is the lowest coverage within the quality budget, and there every head of the full-attention "
                f"layers {full} needs all its key blocks (no pattern keeps that share of the attention mass with fewer "
                "blocks); attention stays dense")
    densities = ", ".join(f"{i}: {row['density']}" for i, row in summary.items())
    return ("the cost model finds no layer where sparse attention beats dense SDPA at any prefill length up to 128k "
            f"(layer densities at {label}: {densities}); attention stays dense")


def _measured(plans: dict[int, LayerSparsity], summary: dict[str, Any], records: dict[int, tuple], lengths: list[int],
              band: float) -> dict[int, LayerSparsity]:
    """Each layer's crossover: the later of the cost model's and the measured one (layout vs SDPA timed on the
    calibration queries / keys at `lengths`); both go into the summary."""
    from optpass.backends.sparse.timing import measured_crossover

    out = {}
    for i, plan in plans.items():
        row = summary[str(i)]
        if not lengths:
            out[i] = plan
            continue
        measured, speedups = measured_crossover(plan, *records[i], lengths, band)
        row.update(predicted_from=plan.min_len, measured_from=measured,
                   measured_speedup={str(n): round(v, 3) for n, v in speedups.items()})
        row["from_tokens"] = max(plan.min_len, measured)
        out[i] = LayerSparsity(plan.heads, row["from_tokens"], plan.block)
    return out


@register_pass
class SparseAttentionPass(Pass):
    name = "sparse_attention"
    config_cls = SparseAttentionConfig
    runs_after = ("quantize", "layer_skip", "linear_attention")  # removed blocks, local layers: nothing to plan
    needs_calibration = True

    def candidates(self, graph: ModelGraph, target: HardwareSpec) -> list[Candidate]:
        sites = tuple(a.name for a in graph.attentions)
        if graph.model_kind == "diffusion_transformer":
            return [image_candidate(self.name, graph, target, self.config.block)]
        if graph.model_kind != "causal_lm" or not sites:
            return [Candidate.skip(self.name, sites, "sparse attention needs a causal LM (long prefills) or a "
                                   "diffusion transformer (image tokens) with attention sites")]
        ctx = self.config.context or max(graph.estimate_shape[2], 1)
        est = prefill_estimate(graph, target, ASSUMED_DENSITY, ctx, self.config.block)
        label = f"block-sparse prefill attention @ {ctx} tokens (planned at density {ASSUMED_DENSITY})"
        return [Candidate(self.name, sites, {"context": ctx}, est, label=label, paths=("module",))]

    def decisions(self, model: nn.Module, chosen: list[Candidate], context: ApplyContext) -> list[Alternatives] | PassResult:
        if _on_images(context):
            return image_decisions(self.name, model, self.config.block, context)
        reason = support_reason(model)
        if reason:
            return PassResult(self.name, model, False, reason=reason)
        full = full_attention_layers(model.config)
        modules = attention_modules(model)
        layers = [i for i in full if i in modules]
        if not layers:
            return PassResult(self.name, model, False, reason="no full-attention layer to make sparse (sliding-window "
                              "layers already attend to a bounded window)")
        cfg = self.config
        limit = getattr(model.config, "max_position_embeddings", None) or cfg.calibration_len
        wanted = cfg.eval_len or max(cfg.context or 0, cfg.calibration_len)
        cal_len, eval_len = min(cfg.calibration_len, limit), min(wanted, limit)
        enable_compressed_attention(model)
        started = time.perf_counter()
        records = capture_queries_keys(model, corpus_ids(model, cal_len, 1, 0))
        candidates = [c for c in DEFAULT_CANDIDATES if c["name"] in cfg.patterns]
        scores = {i: score_layer(*records[i], cfg.block, candidates) for i in layers if i in records}
        self._search_s = time.perf_counter() - started
        self._cal_len, self._eval_len = cal_len, eval_len
        windows = corpus_ids(model, eval_len, cfg.eval_windows, 1)
        tail = min(EVAL_TAIL, eval_len // 2)
        reference = reference_logits(model, windows, tail)
        sites = {getattr(model.get_submodule(a.name), "layer_idx", None): a for a in context.graph.attentions} \
            if context.graph else {}
        band = getattr(context.target, "error_band", 0.05)

        lengths = [n for n in TIMED_LENGTHS if 2 * cfg.block <= n <= cal_len]

        def option(target: float) -> Option:
            plans, summary = self._layers(scores, target, sites, context.target, band)
            forced = {i: LayerSparsity(p.heads, 2, p.block) for i, p in plans.items()}
            settled: dict[int, LayerSparsity] = {}

            def settle() -> dict[int, LayerSparsity]:
                """The predicted crossovers checked against measured ones (once, when this option is tried)."""
                if not settled:
                    settled.update(_measured(plans, summary, records, lengths, band))
                return settled

            def measure(m: nn.Module) -> dict[str, float]:
                undo = install(m, forced)  # quality where sparse runs, whatever the crossover
                try:
                    return tail_quality(m, windows, reference)
                finally:
                    undo()  # back to this option's own plans
            return Option(f"coverage {target}", lambda m: install(m, settle()), measure=measure,
                          value=(settled, summary))

        targets = AUTO_COVERAGES if cfg.coverage == "auto" else (cfg.coverage,)
        return [Alternatives("coverage", [option(t) for t in targets], monotone=True)]

    def _layers(self, scores: dict[int, HeadScores], target: float, sites: dict[int, Any], spec: HardwareSpec,
                band: float) -> tuple[dict[int, LayerSparsity], dict[str, Any]]:
        plans, summary = {}, {}
        for i, layer_scores in scores.items():
            specs, covs, dens = choose(layer_scores, target)
            site = sites.get(i)
            cross = layer_crossover(site, spec, _density_at(specs, dens, self.config.block), self.config.block, band) \
                if site is not None else None
            names = sorted({s["name"] for s in specs})
            summary[str(i)] = {"coverage": round(sum(covs) / len(covs), 4), "density": round(sum(dens) / len(dens), 4),
                               "patterns": names, "from_tokens": cross}
            if cross is not None and names != ["dense"]:
                plans[i] = LayerSparsity(tuple(specs), cross, self.config.block)
        return plans, summary

    def finish(self, model: nn.Module, kept: dict[str, Option | None], outcomes: dict[str, list[Outcome]],
               context: ApplyContext) -> PassResult:
        if _on_images(context):
            return image_finish(self.name, model, kept, outcomes)
        tried = outcomes["coverage"]
        details: dict[str, Any] = {"search_s": round(self._search_s, 1), "calibration_tokens": self._cal_len,
                                   "quality_window_tokens": self._eval_len,
                                   "tried": [o.to_dict() for o in tried]}
        if kept["coverage"] is None:
            return PassResult(self.name, model, False, details=details,
                              reason=f"no coverage target meets the quality budget ({tried[-1].why})")
        plans, summary = kept["coverage"].value
        details["layers"] = summary
        details["note"] = ("per layer: predicted_from is the cost model's crossover, measured_from the shortest "
                           f"timed length {TIMED_LENGTHS} from which the layout beat SDPA by the error band; the later "
                           "one is kept (from_tokens)")
        if not plans:
            install(model, {})
            return PassResult(self.name, model, False, details=details, reason=_empty_plan_reason(kept["coverage"].label, summary))
        shortest = min(p.min_len for p in plans.values())
        details["sparse_from_tokens"] = shortest
        sites = tuple(n for n, _ in model.named_modules() if getattr(_, ATTRIBUTE, None) is not None)
        note = f"prefills shorter than {shortest} tokens stay dense (below the cost model's crossover)"
        return PassResult(self.name, model, True, sites, reason=note, details=details)

    def saved_state(self, model: nn.Module) -> dict[str, Any]:
        image = getattr(model, IMAGE_ATTRIBUTE, None)
        if image is not None:
            return {"image": image.to_dict()}
        return {"layers": {str(i): getattr(m, ATTRIBUTE).to_dict() for i, m in attention_modules(model).items()
                           if getattr(m, ATTRIBUTE, None) is not None}}

    def restore(self, model: nn.Module, state: dict[str, Any]) -> nn.Module:
        if "image" in state:
            install_image_sparse(model, ImageSparsity.from_dict(state["image"]))
            return model
        enable_compressed_attention(model)
        install(model, {int(i): LayerSparsity.from_dict(d) for i, d in state.get("layers", {}).items()})
        return model
