"""Quality guard: metrics of a rewritten model against the unoptimized reference, and the budget that
the pass manager enforces (a pass that exceeds it is rolled back).

Metrics (`optpass/metrics.py`, all on real tokens: padding is masked out): logits KL(ref || new) and top-1
agreement, perplexity on real text, passkey retrieval accuracy at a context length, PSNR / relative L2 for
continuous outputs (diffusion, generic modules), pooled-embedding cosine for encoders. A budget term that no
metric of the model's kind measures is refused (`QualityBudget.check_measurable`), never silently ignored.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from optpass.adapters import Batch, ModelAdapter
from optpass.errors import ConfigError
from optpass.hf_compat import with_cache
from optpass.metrics import embedding_cosine, logits_kl, perplexity, psnr, rel_l2, top1_agreement

__all__ = ["QualityBudget", "QualityGuard", "embedding_cosine", "logits_kl", "passkey_accuracy", "perplexity", "psnr",
           "rel_l2", "stepwise_logits", "top1_agreement"]


@torch.no_grad()
def stepwise_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits [S, V] of a batch-1 causal LM fed `ids` [1, S] one token at a time through its KV cache: the
    numerics greedy generation sees. A quantized model's kernels depend on the row count (a decode step and a
    prefill take different paths), so agreement with generation is measured this way, not on a prefill."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    steps = [model(input_ids=ids[:, t:t + 1], **with_cache(model, cache), use_cache=True).logits[0, -1]
             for t in range(ids.shape[1])]
    return torch.stack(steps).float()


@torch.no_grad()
def passkey_accuracy(model: nn.Module, tokenizer: Any, context_tokens: int, depths: tuple[float, ...] = (0.1, 0.5, 0.9),
                     trials: int = 2, seed: int = 0) -> float:
    """Fraction of haystacks (each depth x trial) whose greedy answer starts with the hidden key."""
    from optpass.corpus import passkey_prompt

    hits = total = 0
    for d in depths:
        for t in range(trials):
            key = 10000 + (seed * 7919 + t * 104729 + int(d * 1000)) % 89999
            ids, answer = passkey_prompt(tokenizer, context_tokens, d, key, seed=seed + t)
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            hits += answer in text.replace(",", "")
            total += 1
    return hits / total


# budget field -> (its term in "ppl:2%" strings, the metric key it limits)
_BUDGET_TERMS = {"max_ppl_increase": ("ppl", "ppl_increase"), "max_kl": ("kl", "kl"), "min_top1": ("top1", "top1"),
                 "min_psnr": ("psnr", "psnr"), "max_rel_l2": ("rel_l2", "rel_l2"), "min_cosine": ("cosine", "cosine")}


@dataclass(frozen=True)
class QualityBudget:
    """Limits a rewritten model must stay within, relative to the reference. None = not checked."""

    max_ppl_increase: float | None = None  # relative, 0.02 = +2%
    max_kl: float | None = None  # nats per token
    min_top1: float | None = None  # in [0, 1]
    min_psnr: float | None = None  # dB
    max_rel_l2: float | None = None
    min_cosine: float | None = None  # pooled-embedding cosine similarity (encoders), worst row

    def __post_init__(self) -> None:
        checks = {
            "max_ppl_increase": (0.0, math.inf),
            "max_kl": (0.0, math.inf),
            "min_top1": (0.0, 1.0),
            "min_psnr": (0.0, math.inf),
            "max_rel_l2": (0.0, math.inf),
            "min_cosine": (-1.0, 1.0),
        }
        for name, (lo, hi) in checks.items():
            value = getattr(self, name)
            if value is not None and not (lo <= value <= hi):
                raise ConfigError(f"quality budget {name}={value} is impossible; allowed range [{lo}, {hi}]")

    @classmethod
    def default_for(cls, kind: str) -> QualityBudget:
        """Sensible defaults: LMs may lose at most 1% perplexity and 0.01 nats of KL per token (perplexity alone
        let a Gemma-3 int8 plan through that matched fp32's greedy output on 31% of 16 tokens); continuous outputs
        keep PSNR >= 30 dB; sentence encoders keep every pooled embedding at cosine >= 0.99; classifiers' logits
        KL <= 0.01."""
        defaults = {"causal_lm": cls(max_ppl_increase=0.01, max_kl=0.01), "diffusion_transformer": cls(min_psnr=30.0),
                    "encoder": cls(min_cosine=0.99), "classifier": cls(max_kl=0.01)}
        return defaults.get(kind, cls(max_rel_l2=0.05))

    def check_measurable(self, metrics: tuple[str, ...], kind: str) -> None:
        """Raise `ConfigError` for a budget term no metric of this model kind measures (`psnr:30` on an LM)."""
        missing = [f"{term} ({field})" for field, (term, metric) in _BUDGET_TERMS.items()
                   if getattr(self, field) is not None and metric not in metrics]
        if missing:
            available = sorted(t for t, m in _BUDGET_TERMS.values() if m in metrics)
            raise ConfigError(f"quality budget term(s) {', '.join(missing)} cannot be measured on a {kind} model; "
                              f"its metrics give: {', '.join(available)}")

    @classmethod
    def parse(cls, text: str) -> QualityBudget:
        """Parse `"ppl:2%,kl:0.05,top1:0.9,psnr:30,rel_l2:0.01"`."""
        keys = {term: field for field, (term, _) in _BUDGET_TERMS.items()}
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            m = re.fullmatch(r"(\w+)\s*[:=]\s*([-+0-9.eE]+)\s*(%?)", part)
            if not m or m.group(1) not in keys:
                raise ConfigError(f"cannot parse quality budget term {part!r}; use e.g. 'ppl:2%' with keys {sorted(keys)}")
            values[keys[m.group(1)]] = float(m.group(2)) / (100 if m.group(3) else 1)
        return cls(**values)

    def violations(self, metrics: dict[str, float]) -> list[str]:
        """Human-readable reasons the metrics break this budget (empty: within budget)."""
        out = []
        limits = [
            ("ppl_increase", self.max_ppl_increase, lambda v, lim: v <= lim, "perplexity increase {v:+.2%} > {lim:.2%}"),
            ("kl", self.max_kl, lambda v, lim: v <= lim, "KL {v:.4f} > {lim}"),
            ("top1", self.min_top1, lambda v, lim: v >= lim, "top-1 agreement {v:.3f} < {lim}"),
            ("psnr", self.min_psnr, lambda v, lim: v >= lim, "PSNR {v:.1f} dB < {lim} dB"),
            ("rel_l2", self.max_rel_l2, lambda v, lim: v <= lim, "relative L2 {v:.4f} > {lim}"),
            ("cosine", self.min_cosine, lambda v, lim: v >= lim, "pooled-embedding cosine {v:.4f} < {lim}"),
        ]
        for key, lim, ok, text in limits:
            if lim is not None and key in metrics and not ok(metrics[key], lim):
                out.append(text.format(v=metrics[key], lim=lim))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class QualityGuard:
    """Holds the reference outputs on verification batches and scores any rewritten model against them."""

    def __init__(self, adapter: ModelAdapter, reference: nn.Module, batches: list[Batch], budget: QualityBudget) -> None:
        self.adapter = adapter
        self.batches = batches
        self.budget = budget
        self.masks = [adapter.valid_mask(b) for b in batches]  # real tokens; padding is never scored
        self.reference_all = self._all_outputs(reference)
        self.reference_outputs = [outs[0] for outs in self.reference_all]
        self.reference_metrics = self._absolute(self.reference_outputs)

    @torch.no_grad()
    def _outputs(self, model: nn.Module) -> list[torch.Tensor]:
        """The primary output per batch (the one perplexity and PSNR read)."""
        return [outs[0] for outs in self._all_outputs(model)]

    @torch.no_grad()
    def _all_outputs(self, model: nn.Module) -> list[list[torch.Tensor]]:
        return [[t.detach() for t in self.adapter.output_tensors(b.run(model))] for b in self.batches]

    def _labels(self, batch: Batch) -> torch.Tensor | None:
        return (batch.kwargs or {}).get("input_ids")

    def _absolute(self, outputs: list[torch.Tensor]) -> dict[str, float]:
        if "perplexity" not in self.adapter.metrics:
            return {}
        ppls = [perplexity(o, self._labels(b), self.masks[i]) for i, (o, b) in enumerate(zip(outputs, self.batches))
                if self._labels(b) is not None]
        return {"perplexity": float(torch.tensor(ppls).log().mean().exp())} if ppls else {}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of `model` vs the reference on real tokens; `finite` is 0.0 when any output is NaN/inf."""
        every = self._all_outputs(model)
        outputs = [outs[0] for outs in every]
        metrics: dict[str, float] = {"finite": float(all(torch.isfinite(o).all() for outs in every for o in outs))}
        triples = list(zip(self.reference_outputs, outputs, self.masks))
        all_triples = [(r, n, m) for refs, news, m in zip(self.reference_all, every, self.masks) for r, n in zip(refs, news)]
        wanted = self.adapter.metrics
        if "kl" in wanted:
            metrics["kl"] = sum(logits_kl(r, n, m) for r, n, m in triples) / len(triples)
            metrics["top1"] = sum(top1_agreement(r, n, m) for r, n, m in triples) / len(triples)
        if "rel_l2" in wanted:
            metrics["rel_l2"] = max(rel_l2(r, n, m) for r, n, m in all_triples)
        if "psnr" in wanted:
            metrics["psnr"] = min(psnr(r, n, mask=m) for r, n, m in triples)
        if "cosine" in wanted:
            metrics["cosine"] = min(embedding_cosine(r, n, m) for r, n, m in all_triples)
        absolute = self._absolute(outputs)
        if "perplexity" in absolute:
            metrics["perplexity"] = absolute["perplexity"]
            metrics["ppl_increase"] = absolute["perplexity"] / self.reference_metrics["perplexity"] - 1
        return metrics

    def check(self, metrics: dict[str, float]) -> list[str]:
        if metrics.get("finite", 1.0) < 1.0:
            return ["outputs contain NaN or inf"]
        return self.budget.violations(metrics)
