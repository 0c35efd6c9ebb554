"""Quality guard: metrics of a rewritten model against the unoptimized reference, and the budget that
the pass manager enforces (a pass that exceeds it is rolled back).

Metrics: logits KL(ref || new) and top-1 agreement, perplexity on real text, passkey retrieval
accuracy at a context length, and PSNR / relative L2 for continuous outputs (diffusion).
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


def logits_kl(ref: torch.Tensor, new: torch.Tensor) -> float:
    """Mean over positions of KL(softmax(ref) || softmax(new)), in nats."""
    ref_lp = F.log_softmax(ref.float().flatten(0, -2), dim=-1)
    new_lp = F.log_softmax(new.float().flatten(0, -2), dim=-1)
    return float(F.kl_div(new_lp, ref_lp, log_target=True, reduction="batchmean"))


def top1_agreement(ref: torch.Tensor, new: torch.Tensor) -> float:
    return float((ref.argmax(-1) == new.argmax(-1)).float().mean())


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


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) of `logits` [B, S, V] on `ids` [B, S]."""
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="mean")
    return float(torch.exp(loss))


def rel_l2(ref: torch.Tensor, new: torch.Tensor) -> float:
    return float((new.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def psnr(ref: torch.Tensor, new: torch.Tensor, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB; the range defaults to the reference's max - min."""
    ref, new = ref.float(), new.float()
    mse = float(((ref - new) ** 2).mean())
    rng = data_range if data_range is not None else float(ref.max() - ref.min())
    return math.inf if mse == 0 else 20 * math.log10(max(rng, 1e-12)) - 10 * math.log10(mse)


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


@dataclass(frozen=True)
class QualityBudget:
    """Limits a rewritten model must stay within, relative to the reference. None = not checked."""

    max_ppl_increase: float | None = None  # relative, 0.02 = +2%
    max_kl: float | None = None  # nats per token
    min_top1: float | None = None  # in [0, 1]
    min_psnr: float | None = None  # dB
    max_rel_l2: float | None = None

    def __post_init__(self) -> None:
        checks = {
            "max_ppl_increase": (0.0, math.inf),
            "max_kl": (0.0, math.inf),
            "min_top1": (0.0, 1.0),
            "min_psnr": (0.0, math.inf),
            "max_rel_l2": (0.0, math.inf),
        }
        for name, (lo, hi) in checks.items():
            value = getattr(self, name)
            if value is not None and not (lo <= value <= hi):
                raise ConfigError(f"quality budget {name}={value} is impossible; allowed range [{lo}, {hi}]")

    @classmethod
    def default_for(cls, kind: str) -> QualityBudget:
        """Sensible defaults: LMs may lose at most 2% perplexity; continuous outputs keep PSNR >= 30 dB."""
        if kind == "causal_lm":
            return cls(max_ppl_increase=0.02)
        if kind == "diffusion_transformer":
            return cls(min_psnr=30.0)
        return cls(max_rel_l2=0.05)

    @classmethod
    def parse(cls, text: str) -> QualityBudget:
        """Parse `"ppl:2%,kl:0.05,top1:0.9,psnr:30,rel_l2:0.01"`."""
        keys = {"ppl": "max_ppl_increase", "kl": "max_kl", "top1": "min_top1", "psnr": "min_psnr", "rel_l2": "max_rel_l2"}
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
        self.reference_outputs = self._outputs(reference)
        self.reference_metrics = self._absolute(self.reference_outputs)

    @torch.no_grad()
    def _outputs(self, model: nn.Module) -> list[torch.Tensor]:
        return [self.adapter.output_tensor(b.run(model)).detach() for b in self.batches]

    def _labels(self, batch: Batch) -> torch.Tensor | None:
        return (batch.kwargs or {}).get("input_ids")

    def _absolute(self, outputs: list[torch.Tensor]) -> dict[str, float]:
        if "perplexity" not in self.adapter.metrics:
            return {}
        ppls = [perplexity(o, self._labels(b)) for o, b in zip(outputs, self.batches) if self._labels(b) is not None]
        return {"perplexity": float(torch.tensor(ppls).log().mean().exp())} if ppls else {}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of `model` vs the reference; `finite` is 0.0 when any output is NaN/inf."""
        outputs = self._outputs(model)
        metrics: dict[str, float] = {"finite": float(all(torch.isfinite(o).all() for o in outputs))}
        pairs = list(zip(self.reference_outputs, outputs))
        if "kl" in self.adapter.metrics:
            metrics["kl"] = sum(logits_kl(r, n) for r, n in pairs) / len(pairs)
            metrics["top1"] = sum(top1_agreement(r, n) for r, n in pairs) / len(pairs)
        if "rel_l2" in self.adapter.metrics:
            metrics["rel_l2"] = max(rel_l2(r, n) for r, n in pairs)
            metrics["psnr"] = min(psnr(r, n) for r, n in pairs)
        absolute = self._absolute(outputs)
        if "perplexity" in absolute:
            metrics["perplexity"] = absolute["perplexity"]
            metrics["ppl_increase"] = absolute["perplexity"] / self.reference_metrics["perplexity"] - 1
        return metrics

    def check(self, metrics: dict[str, float]) -> list[str]:
        if metrics.get("finite", 1.0) < 1.0:
            return ["outputs contain NaN or inf"]
        return self.budget.violations(metrics)
