"""KV-cache compression: a compressing cache inserted in front of every attention site.

Per-layer budgets (uniform / pyramid / measured density) of policy-scored tokens (StreamingLLM sinks +
recency, H2O heavy hitters, SnapKV observation window; optional D2O-style merging), stored packed
(int8 / int4, KIVI layout) with a full-precision recent window. The cost model estimates a decode step at
`config.context` tokens, so `auto` enables it only where the saved KV bytes beat the eviction work. `apply`
measures the continuation quality of the compressed cache against the full one on corpus text and keeps
the most aggressive keep ratio within the quality budget; the chosen settings go to the decode runtime
(`PassResult.runtime`), which builds the cache for every `generate()`. Cache layers: `backends/kv/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optpass.backends.kv import CompressedKVCache, KVSettings, enable_compressed_attention
from optpass.backends.kv.attention import support_reason
from optpass.cost_models.hardware import HardwareSpec
from optpass.cost_models.kv_cache import kv_estimate
from optpass.errors import ConfigError
from optpass.hf_compat import FULL, layer_kinds, with_cache
from optpass.pass_base import Alternatives, ApplyContext, Candidate, Option, Outcome, Pass, PassConfig, PassResult
from optpass.backends.kv.policies import POLICIES
from optpass.backends.kv.policies.budgets import SCHEDULES, attention_density, schedule_weights
from optpass.quality import logits_kl, top1_agreement
from optpass.registry import register_pass
from optpass.sites import ModelGraph

AUTO_KEEPS = (0.125, 0.25, 0.5)  # tried most aggressive first under `keep="auto"`
EVAL_CONTEXT, EVAL_CONTINUATION = 1024, 64


@dataclass(frozen=True)
class KVCacheConfig(PassConfig):
    policy: str = "snapkv"  # one of backends/kv/policies (streaming, h2o, snapkv)
    keep: float | int | str = "auto"  # ratio in (0, 1], token count, or "auto" (smallest of AUTO_KEEPS within budget)
    bits: int | None = 8  # packed KV: 8, 4, or None (model dtype)
    window: int = 32  # full-precision recent tokens
    sink: int = 4
    merge_threshold: float | None = None  # merge evicted tokens into a kept one above this key cosine similarity
    schedule: str = "uniform"  # per-layer budgets: uniform | pyramid | density (measured on calibration text)
    # context length the cost model plans for; None = the captured example's (short: auto then leaves the cache
    # alone, since compression only pays past its crossover; set e.g. 4096 for long-context serving)
    context: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"KVCacheConfig.policy={self.policy!r}; known: {sorted(POLICIES)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"KVCacheConfig.schedule={self.schedule!r}; known: {SCHEDULES}")
        if self.keep != "auto":
            self.settings(self.keep)  # validates ratio / token budget / bits
        if self.context is not None and self.context < 2:
            raise ConfigError(f"KVCacheConfig.context={self.context}; must be >= 2")

    def settings(self, keep: float | int, layer_weights: tuple[float, ...] | None = None) -> KVSettings:
        return KVSettings(self.policy, keep, self.window, self.sink, self.bits, self.merge_threshold, layer_weights)


@torch.no_grad()
def continuation_quality(model: nn.Module, settings: KVSettings, windows: torch.Tensor,
                         continuation: int = EVAL_CONTINUATION) -> dict[str, float]:
    """KL / top-1 / perplexity change of the last `continuation` tokens of each window when the earlier tokens
    went through the compressed cache, vs the full cache (one exact forward)."""
    prefix = windows.shape[1] - continuation
    kls, top1s, ppl_ref, ppl_new = [], [], [], []
    for ids in windows.split(1):
        ref = model(input_ids=ids, use_cache=False).logits[:, prefix - 1:-1].float()
        cache = CompressedKVCache(settings, model.config)
        first = model(input_ids=ids[:, :prefix], **with_cache(model, cache), use_cache=True).logits[:, -1:]
        rest = model(input_ids=ids[:, prefix:-1], **with_cache(model, cache), use_cache=True).logits
        new = torch.cat([first, rest], dim=1).float()
        target = ids[:, prefix:]
        kls.append(logits_kl(ref, new))
        top1s.append(top1_agreement(ref, new))
        ppl_ref.append(nn.functional.cross_entropy(ref[0], target[0]))
        ppl_new.append(nn.functional.cross_entropy(new[0], target[0]))
    ref_ppl = float(torch.stack(ppl_ref).mean().exp())
    new_ppl = float(torch.stack(ppl_new).mean().exp())
    return {"kl": sum(kls) / len(kls), "top1": sum(top1s) / len(top1s), "perplexity": new_ppl,
            "ppl_increase": new_ppl / ref_ppl - 1}


def _eval_windows(model: nn.Module, calibration: list[Any], context: int = EVAL_CONTEXT) -> torch.Tensor:
    from optpass.adapters import tokenizer_for
    from optpass.corpus import token_windows

    tokenizer = tokenizer_for(model)
    if tokenizer is not None:
        return token_windows(tokenizer, window=context, count=2, offset_windows=3)
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, model.config.vocab_size, (2, min(context, 256)), generator=g)


@register_pass
class KVCachePass(Pass):
    name = "kv_cache"
    config_cls = KVCacheConfig
    runs_after = ("quantize", "linear_attention")  # so that the compiled decoder quantize installs is given the compressed cache
    needs_calibration = True

    def candidates(self, graph: ModelGraph, target: HardwareSpec) -> list[Candidate]:
        sites = tuple(a.name for a in graph.attentions)
        if graph.model_kind != "causal_lm" or not sites:
            return [Candidate.skip(self.name, sites, "KV-cache compression needs a causal LM with attention sites")]
        cfg = self.config
        ctx = cfg.context or max(graph.estimate_shape[2], 1)
        keep = 0.25 if cfg.keep == "auto" else cfg.keep
        ratio = keep if isinstance(keep, float) else min(keep / ctx, 1.0)
        est = kv_estimate(graph, target, ratio, cfg.bits, cfg.window, ctx)
        label = f"{cfg.policy} keep {cfg.keep} {'int' + str(cfg.bits) if cfg.bits else 'float'} KV @ {ctx} ctx"
        return [Candidate(self.name, sites, {"keep": cfg.keep, "context": ctx}, est, label=label, paths=("module",))]

    def decisions(self, model: nn.Module, chosen: list[Candidate], context: ApplyContext) -> list[Alternatives] | PassResult:
        """One decision: the keep ratio, most aggressive first, each scored by continuation quality of the
        compressed vs the full cache (a single forward cannot see a cache)."""
        reason = support_reason(model)
        if reason:
            return PassResult(self.name, model, False, reason=reason)
        enable_compressed_attention(model)
        kinds = layer_kinds(model.config)
        full = [i for i, k in enumerate(kinds) if k.kind == FULL]
        if not full:
            return PassResult(self.name, model, False, reason="every layer is sliding-window: their caches are "
                              "already bounded, nothing to compress")
        cfg = self.config
        weights, densities = None, None
        windows = _eval_windows(model, context.calibration)
        if cfg.schedule == "density":
            densities = [attention_density(model, [w[None] for w in windows])[i] for i in full]
        if cfg.schedule != "uniform":
            weights = schedule_weights(cfg.schedule, len(full), densities)
        self._details = {"densities": densities, "layer_weights": weights,
                         "layers": {"compressed (full attention)": len(full),
                                    "sliding window (bounded, packed)": len(kinds) - len(full)}}
        self._paths = tuple(chosen[0].sites) if chosen else ()

        def option(keep: float | int) -> Option:
            settings = cfg.settings(keep, weights)
            return Option(str(keep), lambda m: (lambda: None), value=settings,
                          measure=lambda m: continuation_quality(m, settings, windows))

        return [Alternatives("keep", [option(k) for k in (AUTO_KEEPS if cfg.keep == "auto" else (cfg.keep,))])]

    def finish(self, model: nn.Module, kept: dict[str, Option | None], outcomes: dict[str, list[Outcome]],
               context: ApplyContext) -> PassResult:
        tried = outcomes["keep"]
        details = {"continuation_quality": {o.label: o.quality for o in tried}, **self._details}
        if kept["keep"] is None:
            return PassResult(self.name, model, False, details=details, reason=f"no keep ratio in "
                              f"{[o.label for o in tried]} meets the quality budget ({tried[-1].why})")
        settings = _settings_dict(kept["keep"].value)
        details["settings"] = settings
        return PassResult(self.name, model, True, self._paths, details=details, runtime={"kv": settings})

    def saved_state(self, model: nn.Module) -> dict[str, Any]:
        return {"attention": model.config._attn_implementation}

    def restore(self, model: nn.Module, state: dict[str, Any]) -> nn.Module:
        """The compressed cache is the runtime's (recorded in the checkpoint's decode plan); attention must
        route through optpass's function for its layers to attend."""
        enable_compressed_attention(model)
        return model


def _settings_dict(settings: KVSettings) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(settings)
