"""Dynamic layer skipping (SkipDecode-style): depth that shrinks with position, shared by the batch, KV-cache safe.

Tokens up to `warmup` run every block; from there one more block is skipped every `every` positions, least
influential first (ShortGPT block influence, as the static `layer_skip` pass ranks them), up to `max_skipped`
blocks. The schedule is monotone in position, so keys and values a later token needs always exist and nothing
is recomputed (`backends/skip_schedule.py`). The pass offers schedules of `max_skipped` down to 1 blocks, most
aggressive first; the pass manager keeps the first within the quality budget, measured on the verification
windows (only schedules whose last threshold those windows reach are offered: the rest would go unmeasured).
Every tried schedule is reported with its share of block evaluations at the verification length, so the
report is the quality-vs-compute curve. The runtime's compiled step keeps one graph per stage (number of
blocks skipped by the whole batch) and does not draft with a schedule (a rejected draft could not be rolled
back past blocks that did not run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from optpass.backends.skip_schedule import compute_fraction, install_schedule, ramp, scheduled
from optpass.cost_models.hardware import HardwareSpec
from optpass.cost_models.model_cost import baseline_latency, model_estimate
from optpass.errors import ConfigError
from optpass.pass_base import Alternatives, ApplyContext, Candidate, Option, Outcome, Pass, PassConfig, PassResult
from optpass.passes.layer_skip import block_influence, decoder_layers, token_batches
from optpass.registry import register_pass
from optpass.sites import ModelGraph


@dataclass(frozen=True)
class DynamicSkipConfig(PassConfig):
    max_skipped: int = 8  # most blocks a schedule skips (offered from this many down to 1)
    warmup: int = 64  # positions that always run every block
    every: int = 16  # positions between one more skipped block and the next
    context: int = 256  # the sequence length the compute share and the cost estimate are stated at

    def __post_init__(self) -> None:
        if self.max_skipped < 1 or self.warmup < 0 or self.every < 1 or self.context < 1:
            raise ConfigError(f"DynamicSkipConfig max_skipped={self.max_skipped} and every={self.every} must be >= 1, "
                              f"warmup={self.warmup} >= 0, context={self.context} >= 1")


@register_pass
class DynamicSkipPass(Pass):
    name = "dynamic_skip"
    config_cls = DynamicSkipConfig
    runs_after = ("awq", "quantize", "layer_skip")
    needs_calibration = True

    def candidates(self, graph: ModelGraph, target: HardwareSpec) -> list[Candidate]:
        cfg = self.config
        blocks = graph.blocks
        label = f"skip up to {cfg.max_skipped} blocks from position {cfg.warmup}, one more every {cfg.every}"
        if graph.model_kind != "causal_lm" or len(blocks) < 4:
            return [Candidate.skip(self.name, (), "dynamic skipping needs a causal LM with at least 4 decoder blocks",
                                   label)]
        n = min(cfg.max_skipped, len(blocks) - 2)
        share = compute_fraction(ramp(list(range(n)), cfg.warmup, cfg.every), len(blocks), cfg.context)
        est = model_estimate(graph, target, d_latency=-baseline_latency(graph, target) * (1 - share))
        return [Candidate(self.name, tuple(b.name for b in blocks), {"blocks": len(blocks)}, est, label=label,
                          paths=("module",))]

    def decisions(self, model: nn.Module, chosen: list[Candidate], context: ApplyContext) -> list[Alternatives] | PassResult:
        cfg = self.config
        layers = decoder_layers(model)
        if layers is None:
            return PassResult(self.name, model, False, reason=f"{type(model).__name__} has no `model.layers` list of "
                              "decoder blocks to schedule")
        batches = token_batches(context.calibration)
        if not batches:
            return PassResult(self.name, model, False, reason="no calibration token ids to rank blocks on")
        candidates = [i for i in range(1, len(layers) - 1) if not hasattr(layers[i], "optpass_skip_from")
                      and hasattr(layers[i], "self_attn")]  # blocks a static removal left in place
        verify_len = min(int(b["input_ids"].shape[1]) for b in batches)
        measurable = (verify_len - 1 - cfg.warmup) // cfg.every + 1  # schedules whose last threshold is scored
        top = min(cfg.max_skipped, len(candidates), measurable)
        if top < 1:
            return PassResult(self.name, model, False, reason=f"the schedule starts skipping at position {cfg.warmup}, "
                              f"past the {verify_len}-token quality windows: its effect cannot be measured (lower "
                              "warmup)")
        influence = block_influence(model, batches)
        order = sorted(candidates, key=lambda i: influence[i])[:top]
        self._influence = [round(v, 5) for v in influence]
        self._blocks, self._verify_len = len(layers), verify_len

        def option(n: int) -> Option:
            thresholds = ramp(order[:n], cfg.warmup, cfg.every)
            share = compute_fraction(thresholds, len(layers), verify_len)
            return Option(f"skip {n} blocks ({share:.3f} of the compute at {verify_len} tokens)",
                          lambda m: install_schedule(decoder_layers(m), thresholds), value=thresholds)

        return [Alternatives("skip schedule", [option(n) for n in range(top, 0, -1)], monotone=True)]

    def finish(self, model: nn.Module, kept: dict[str, Option | None], outcomes: dict[str, list[Outcome]],
               context: ApplyContext) -> PassResult:
        tried = outcomes["skip schedule"]
        details: dict[str, Any] = {"block_influence": self._influence, "tried": [o.to_dict() for o in tried],
                                   "warmup": self.config.warmup, "every": self.config.every}
        if kept["skip schedule"] is None:
            return PassResult(self.name, model, False, details=details,
                              reason=f"skipping even one block from position {self.config.warmup} exceeds the quality "
                              f"budget ({tried[-1].why})")
        thresholds = kept["skip schedule"].value
        details["schedule"] = {str(k): v for k, v in thresholds.items()}
        details["compute_share"] = {str(n): round(compute_fraction(thresholds, self._blocks, n), 4)
                                    for n in (self._verify_len, self.config.context, 1024, 4096)}
        return PassResult(self.name, model, True, tuple(f"model.layers.{i}" for i in thresholds), details=details,
                          runtime={"skip": {str(k): v for k, v in thresholds.items()}})

    def saved_state(self, model: nn.Module) -> dict[str, Any]:
        return {"schedule": {str(k): v for k, v in scheduled(decoder_layers(model)).items()}}

    def restore(self, model: nn.Module, state: dict[str, Any]) -> nn.Module:
        install_schedule(decoder_layers(model), {int(k): int(v) for k, v in state.get("schedule", {}).items()})
        return model
