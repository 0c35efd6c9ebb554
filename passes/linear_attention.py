"""Linear attention, honestly: no training-free conversion of softmax attention to true linear attention exists,
so a full-attention layer is converted only where its measured quality stays within budget, in one of two ways:

- `sliding_window` (training-free, LightTransfer-style): layers whose attention is measured to be local become
  sliding-window layers with attention sinks and a bounded, constant-size decode cache (a layer's "state" is its
  sinks + window instead of a cache that grows with the context). One calibration forward records every layer's
  queries and keys; each full layer is ranked by the share of its exact attention mass on the first `sink` tokens
  plus the trailing `window` (`backends/kv/locality.py`).
- `hedgehog` (learned, LoLCATs's first stage): each layer keeps exact softmax attention over sinks + window and
  attends linearly, through Hedgehog feature maps, to every earlier token (`backends/linear/hybrid.py`). The maps
  are fitted by attention transfer with the model frozen (`backends/linear/fit.py`: one calibration forward
  records each layer's q / k / v; Adam on the layer's output error against its exact softmax output); layers are
  ranked by their fitted error. The decode state is sinks + window + a constant-size (S, z).

The decision is how many of the best-ranked layers to convert, most first, each measured by perplexity / KL /
top-1 of every position past the window (up to SCORED_MAX) of long corpus windows against the unconverted model;
the first share within the quality budget is kept, and when none is the pass says so with the per-layer figures.
A converted layer's prefill and Hugging Face's own decode loop attend through the narrowed mask
(`backends/kv/band.py`) or the hybrid's parallel form; optpass's decode runtime gives it a ring of sink + window
slots (`backends/kv/ring.py`), plus the linear state for a hybrid (`HybridLayer`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from optpass.backends.kv import enable_compressed_attention
from optpass.backends.kv.attention import support_reason
from optpass.backends.kv.locality import local_mass
from optpass.backends.linear.feature_map import HedgehogMaps, attach, maps_of
from optpass.backends.linear.fit import STEPS as FIT_STEPS
from optpass.backends.linear.fit import fit_layer, record_attention
from optpass.backends.sparse.search import capture_queries_keys
from optpass.cost_models.hardware import HardwareSpec
from optpass.cost_models.local_attention import local_estimate
from optpass.errors import ConfigError
from optpass.hf_compat import (LINEAR_LAYERS, LOCAL_LAYERS, attention_modules, full_attention_layers, linear_layers,
                               local_layers, text_config)
from optpass.long_context import corpus_ids, reference_logits, tail_quality
from optpass.pass_base import Alternatives, ApplyContext, Candidate, Option, Outcome, Pass, PassConfig, PassResult
from optpass.progress import track
from optpass.registry import register_pass
from optpass.sites import ModelGraph

METHODS = {"sliding_window": "full layers with local attention become sinks + sliding-window layers (training-free)",
           "hedgehog": "full layers become sinks + sliding window + linear attention through Hedgehog feature maps "
                       "fitted by attention transfer (LoLCATs stage 1, model frozen)"}
SCORED_MAX = 4096  # positions scored per quality window (their logits are held twice)
PLANNED_SHARE = 0.5  # share of the full layers the planning estimate assumes converted, before calibration


@dataclass(frozen=True)
class LinearAttentionConfig(PassConfig):
    version: ClassVar[int] = 2  # 2: method "hedgehog", fit_steps
    method: str = "sliding_window"
    window: int = 1024  # trailing tokens a converted layer attends to
    sink: int = 4  # first tokens it always attends to (StreamingLLM's attention sinks)
    # share of the full layers converted, tried in order (LightTransfer converts up to half); at least one full
    # layer always stays full, so a model keeps some attention over the whole context
    shares: tuple[float, ...] = (0.5, 0.25, 0.125)
    # tokens of the forward whose queries / keys rank the layers (hedgehog: fit the maps; at least eval_len)
    calibration_len: int = 4096
    eval_len: int | None = None  # tokens per quality window; None = max(context, calibration_len)
    eval_windows: int = 1
    # decode context the cost model plans at and the memory saving is reported at; None = optimize()'s planned
    # context for planning (a short one gains nothing) and the quality window's length for the report
    context: int | None = None
    fit_steps: int = FIT_STEPS  # hedgehog: Adam steps of attention transfer per layer

    def __post_init__(self) -> None:
        if self.fit_steps < 1:
            raise ConfigError(f"LinearAttentionConfig.fit_steps={self.fit_steps}; at least 1")
        if self.method not in METHODS:
            raise ConfigError(f"LinearAttentionConfig.method={self.method!r}; known: {sorted(METHODS)}")
        if self.window < 1 or self.sink < 0:
            raise ConfigError(f"LinearAttentionConfig window={self.window} must be >= 1 and sink={self.sink} >= 0")
        if not self.shares or any(not 0 < s <= 1 for s in self.shares) or list(self.shares) != sorted(self.shares,
                                                                                                    reverse=True):
            raise ConfigError(f"LinearAttentionConfig.shares={self.shares}: shares in (0, 1], largest first")
        if self.eval_windows < 1:
            raise ConfigError(f"LinearAttentionConfig.eval_windows={self.eval_windows}; at least 1")


def set_local(model: nn.Module, layers: dict[int, tuple[int, int]]) -> None:
    """Make `layers` ({index: (sink, window)}) local; {} makes every layer full again."""
    cfg = text_config(model.config)
    if layers:
        setattr(cfg, LOCAL_LAYERS, {str(i): [s, w] for i, (s, w) in sorted(layers.items())})
    elif hasattr(cfg, LOCAL_LAYERS):
        delattr(cfg, LOCAL_LAYERS)


def set_hybrid(model: nn.Module, layers: dict[int, tuple[int, int]], maps: dict[int, HedgehogMaps]) -> None:
    """Make exactly `layers` ({index: (sink, window)}) sliding-window + linear-attention hybrids attending
    through `maps` (a submodule of each attention module, so the weights are in the state dict); {} converts
    them back to full layers. Layers made plain local (sliding_window) stay as they are."""
    cfg = text_config(model.config)
    modules = attention_modules(model)
    before = linear_layers(cfg)
    for i in before:
        attach(modules[i], None)
    plain = {i: v for i, v in local_layers(cfg).items() if i not in before}
    set_local(model, {**plain, **layers})
    if layers:
        setattr(cfg, LINEAR_LAYERS, [str(i) for i in sorted(layers)])
    elif hasattr(cfg, LINEAR_LAYERS):
        delattr(cfg, LINEAR_LAYERS)
    for i in layers:
        attach(modules[i], maps[i])


def kv_cache_bytes(model: nn.Module, context: int, unconverted: bool = False) -> int:
    """Bytes the decode runtime's uncompressed cache allocates for one sequence of `context` tokens (with every
    layer this pass converted back to full when `unconverted`): rings and linear states included."""
    from optpass.backends.kv.cache import cache_nbytes, static_cache

    config = copy.deepcopy(model.config)
    if unconverted:
        for name in (LOCAL_LAYERS, LINEAR_LAYERS):
            if hasattr(text_config(config), name):
                delattr(text_config(config), name)
    cfg = text_config(config)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    probe = torch.zeros(1, heads, 1, dim, dtype=next(model.parameters()).dtype)
    cache = static_cache(config, context)
    for layer in cache.layers:
        layer.lazy_initialization(probe, probe)
    return cache_nbytes(cache)


def _count(share: float, layers: int) -> int:
    """Layers a share converts: rounded up, one full layer always kept."""
    return min(math.ceil(share * layers), layers - 1)


@register_pass
class LinearAttentionPass(Pass):
    name = "linear_attention"
    config_cls = LinearAttentionConfig
    runs_after = ("quantize", "layer_skip")  # a removed block has no attention to convert
    needs_calibration = True

    def candidates(self, graph: ModelGraph, target: HardwareSpec) -> list[Candidate]:
        sites = tuple(a.name for a in graph.attentions)
        if graph.model_kind != "causal_lm" or not sites:
            return [Candidate.skip(self.name, sites, "local attention layers need a causal LM with attention sites")]
        cfg = self.config
        # the served context (optimize(context=...), else the example's length), as kv_cache and sparse_attention
        # plan: a window saves nothing below its span, so auto must not convert layers for a short context
        ctx = cfg.context or max(graph.estimate_shape[2], 1)
        span = cfg.sink + cfg.window
        est = local_estimate(graph, target, math.ceil(PLANNED_SHARE * len(sites)), span, ctx)
        label = f"sinks {cfg.sink} + window {cfg.window} on the most local layers @ {ctx} ctx"
        return [Candidate(self.name, sites, {"context": ctx}, est, label=label, paths=("module",))]

    def decisions(self, model: nn.Module, chosen: list[Candidate], context: ApplyContext) -> list[Alternatives] | PassResult:
        reason = support_reason(model)
        if reason:
            return PassResult(self.name, model, False, reason=reason)
        cfg = self.config
        full = full_attention_layers(model.config)
        if not full:
            return PassResult(self.name, model, False, reason="no full-attention layer to make local (every layer "
                              "already attends to a bounded window)")
        limit = getattr(model.config, "max_position_embeddings", None) or cfg.calibration_len
        eval_len = min(cfg.eval_len or max(cfg.context or 0, cfg.calibration_len), limit)
        # fitted maps act on post-RoPE queries / keys and do not extrapolate to positions they were not fitted on
        # (SmolLM2: relative error 0.0002 at the 2k fitted on, 0.06-0.1 at 8k), so hedgehog fits on the quality
        # window's length at least
        cal_len = min(max(cfg.calibration_len, eval_len) if cfg.method == "hedgehog" else cfg.calibration_len, limit)
        span = cfg.sink + cfg.window
        if eval_len <= span or cal_len <= span:
            return PassResult(self.name, model, False, reason=f"a window of {cfg.window} + {cfg.sink} sinks hides "
                              f"nothing in {min(eval_len, cal_len)}-token calibration / quality windows, so its "
                              "effect cannot be measured; lower window or raise eval_len / calibration_len")
        enable_compressed_attention(model)
        calibration = corpus_ids(model, cal_len, 1, 0)
        ranked, layers, convert = (self._rank_hedgehog if cfg.method == "hedgehog" else self._rank_local)(
            model, calibration, full)
        windows = corpus_ids(model, eval_len, cfg.eval_windows, 1)
        # every position past the window is affected (a window's first positions lose the document's start, the
        # tail only the distant middle): score them all, up to SCORED_MAX
        tail = min(SCORED_MAX, eval_len - span)
        reference = reference_logits(model, windows, tail)
        self._summary = {"method": cfg.method, "calibration_tokens": cal_len, "quality_window_tokens": eval_len,
                         "scored_tokens": tail, "layers": layers}
        self._context = cfg.context or eval_len

        def option(share: float) -> Option:
            chosen_layers = sorted(ranked[:_count(share, len(ranked))])
            return Option(f"{len(chosen_layers)} of {len(ranked)} layers {self._word()}",
                          lambda m: convert(m, chosen_layers),
                          measure=lambda m: tail_quality(m, windows, reference), value=chosen_layers)

        options, seen = [], set()
        for share in cfg.shares:  # shares that round to the same layer count are one option
            n = _count(share, len(ranked))
            if 0 < n and n not in seen:
                seen.add(n)
                options.append(option(share))
        if not options:
            return PassResult(self.name, model, False, reason=f"only {len(ranked)} full-attention layer(s): making "
                              "one local would leave no layer that attends over the whole context")
        return [Alternatives("layers", options, monotone=True)]

    def _word(self) -> str:
        return "hybrid" if self.config.method == "hedgehog" else "local"

    def _rank_local(self, model: nn.Module, calibration: torch.Tensor, full: list[int]
                    ) -> tuple[list[int], dict[str, dict], Callable[[nn.Module, list[int]], Callable[[], None]]]:
        """sliding_window: layers by their attention mass on sinks + window, most local first."""
        cfg = self.config
        records = capture_queries_keys(model, calibration)
        mass = {i: local_mass(*records[i], cfg.sink, cfg.window) for i in full if i in records}
        del records
        ranked = sorted(mass, key=lambda i: -float(mass[i].mean()))
        layers = {str(i): {"local_mass": round(float(mass[i].mean()), 4),
                           "local_mass_min_head": round(float(mass[i].min()), 4)} for i in ranked}
        previous = local_layers(model.config)

        def convert(m: nn.Module, chosen_layers: list[int]) -> Callable[[], None]:
            set_local(m, {**previous, **{i: (cfg.sink, cfg.window) for i in chosen_layers}})
            return lambda: set_local(m, previous)
        return ranked, layers, convert

    def _rank_hedgehog(self, model: nn.Module, calibration: torch.Tensor, full: list[int]
                       ) -> tuple[list[int], dict[str, dict], Callable[[nn.Module, list[int]], Callable[[], None]]]:
        """hedgehog: fit every full layer's maps by attention transfer; layers by their fitted output error, lowest
        first."""
        cfg = self.config
        records = record_attention(model, calibration, set(full))
        fitted = {}
        for i in track(sorted(records), "linear_attention: fitting feature maps (attention transfer)"):
            fitted[i] = fit_layer(records.pop(i), cfg.sink, cfg.window, cfg.fit_steps, seed=i)
        ranked = sorted(fitted, key=lambda i: fitted[i].error_after)
        layers = {str(i): {"error_before": round(fitted[i].error_before, 5),
                           "error_after": round(fitted[i].error_after, 5),
                           "fit_s": round(fitted[i].seconds, 2)} for i in ranked}
        self._fit_s = sum(f.seconds for f in fitted.values())
        modules = attention_modules(model)
        previous = ({i: local_layers(model.config)[i] for i in linear_layers(model.config)},
                    {i: maps_of(modules[i]) for i in linear_layers(model.config)})

        def convert(m: nn.Module, chosen_layers: list[int]) -> Callable[[], None]:
            set_hybrid(m, {**previous[0], **{i: (cfg.sink, cfg.window) for i in chosen_layers}},
                       {**previous[1], **{i: fitted[i].maps for i in chosen_layers}})
            return lambda: set_hybrid(m, *previous)
        return ranked, layers, convert

    def finish(self, model: nn.Module, kept: dict[str, Option | None], outcomes: dict[str, list[Outcome]],
               context: ApplyContext) -> PassResult:
        tried = outcomes["layers"]
        word = self._word()
        details: dict[str, Any] = {**self._summary, "tried": [o.to_dict() for o in tried]}
        if self.config.method == "hedgehog":
            details["fit_s_total"] = round(self._fit_s, 2)
        if kept["layers"] is None:
            reason = f"no share of {word} layers meets the quality budget ({tried[-1].why})"
            if self.config.method == "hedgehog":
                errors = ", ".join(f"{i}: {v['error_before']:.3g} -> {v['error_after']:.3g}"
                                   for i, v in list(details["layers"].items())[:3])
                reason += f"; best fitted layers' relative output error (identity maps -> fitted) {errors}"
            return PassResult(self.name, model, False, details=details, reason=reason)
        converted = kept["layers"].value
        for i in converted:
            details["layers"][str(i)]["local" if word == "local" else "converted"] = True
        after = kv_cache_bytes(model, self._context)
        before = kv_cache_bytes(model, self._context, unconverted=True)
        details["kv_cache_bytes"] = {"context": self._context, "full": before, word: after,
                                     "saving": round(1 - after / before, 4)}
        sites = tuple(n for n, m in model.named_modules() if getattr(m, "layer_idx", None) in converted
                      and hasattr(m, "k_proj"))
        cfg = self.config
        how = (f"{cfg.sink} sinks + the last {cfg.window} tokens" if word == "local" else
               f"{cfg.sink} sinks + the last {cfg.window} tokens exactly and every earlier token linearly")
        note = (f"{len(converted)} layers attend to {how}; decode KV cache at {self._context} tokens "
                f"{before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
        return PassResult(self.name, model, True, sites, reason=note, details=details)

    def saved_state(self, model: nn.Module) -> dict[str, Any]:
        modules = attention_modules(model)
        maps = {}
        for i in sorted(linear_layers(model.config)):
            q_weight, k_weight = maps_of(modules[i]).query_weight, maps_of(modules[i]).key_weight
            maps[str(i)] = {"heads": q_weight.shape[0], "kv_heads": k_weight.shape[0], "head_dim": q_weight.shape[1]}
        return {"layers": {str(i): list(v) for i, v in local_layers(model.config).items()}, "hybrid_maps": maps}

    def restore(self, model: nn.Module, state: dict[str, Any]) -> nn.Module:
        """Local layers from the record; hybrids get fresh maps of the recorded shapes, which the checkpoint's
        strict weight load then fills."""
        enable_compressed_attention(model)
        layers = {int(i): (int(v[0]), int(v[1])) for i, v in state.get("layers", {}).items()}
        shapes = {int(i): v for i, v in state.get("hybrid_maps", {}).items()}
        set_local(model, {i: v for i, v in layers.items() if i not in shapes})
        if shapes:
            set_hybrid(model, {i: layers[i] for i in shapes},
                       {i: HedgehogMaps(v["heads"], v["kv_heads"], v["head_dim"]) for i, v in shapes.items()})
        return model
