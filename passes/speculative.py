"""Lossless speculative decoding with a model-free drafter: the decode runtime verifies k proposed tokens in one
forward and keeps the longest prefix the model agrees with (`backends/runtime/verify.py`), so greedy output is
token for token the model's own and sampled output has exactly its distribution.

At batch 1 a decode step is bound by reading the weights, so a forward over k + 1 tokens costs little more than
over one; drafting pays when the accepted tokens per verify exceed that cost ratio. The pass measures the ratio
with the cost model's forward formula (k + 1 rows vs 1 row at the planned context), checks on calibration text
that decoding with the drafter gives the same tokens as without (rolled back otherwise), and hands the proposer
to the runtime, whose gate (`backends/runtime/gate.py`) follows the measured times and acceptance per call and
stops drafting on text that does not repeat its input.

With `proposer="self_draft"` the drafter is the model itself with some blocks skipped
(`backends/runtime/self_draft.py`). Each drafted token then costs a drafting step, so the pass first searches
which blocks to skip and how many tokens to draft (`search_self_draft`: acceptance measured on the model's own
greedy continuations, costs from the cost model) and refuses, with the measured acceptance and the predicted
speedup in the reason, where no setting pays.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optpass.backends.runtime.proposers import PROPOSERS
from optpass.cost_models.hardware import HardwareSpec
from optpass.cost_models.model_cost import predict_forward
from optpass.errors import ConfigError
from optpass.passes.layer_skip import block_influence, decoder_layers, token_batches
from optpass.pass_base import ApplyContext, Candidate, Pass, PassConfig, PassResult
from optpass.registry import register_pass
from optpass.sites import ModelGraph

CHECK_TOKENS = 24  # greedy tokens compared with and without the drafter on a calibration prompt
SEARCH_PROMPT, SEARCH_NEW = 128, 48  # self_draft's search: acceptance over the model's own continuations


@dataclass(frozen=True)
class SpeculativeConfig(PassConfig):
    proposer: str = "prompt_lookup"  # backends/runtime/proposers.py: prompt_lookup | token_recycling | self_draft
    # tokens proposed per verify step (the verify step is compiled for draft + 1); self_draft: the longest tried
    draft: int = 5
    # self_draft: shares of the decoder blocks its search tries skipping while drafting (least influential first)
    skip_shares: tuple[float, ...] = (0.125, 0.25, 0.375, 0.5)
    # tokens emitted per verify step the cost model assumes when predicting the gain (accepted drafts + 1);
    # the runtime replaces it by what it measures on each call
    expected_tokens: float = 2.0
    context: int = 1024  # the context the verify cost is predicted at
    max_cache_len: int = 4096

    def __post_init__(self) -> None:
        if self.proposer not in PROPOSERS:
            raise ConfigError(f"SpeculativeConfig.proposer={self.proposer!r}; known: {sorted(PROPOSERS)}")
        if not 1 <= self.draft <= 15:
            raise ConfigError(f"SpeculativeConfig.draft={self.draft}: propose 1 to 15 tokens per step")
        if self.expected_tokens < 1:
            raise ConfigError(f"SpeculativeConfig.expected_tokens={self.expected_tokens}: at least 1 (the model's own)")
        if not self.skip_shares or any(not 0 < s < 1 for s in self.skip_shares):
            raise ConfigError(f"SpeculativeConfig.skip_shares={self.skip_shares}: shares of the blocks in (0, 1)")


def verify_cost(graph: ModelGraph, target: HardwareSpec, draft: int, context: int) -> float:
    """A (draft + 1)-token forward's time in one-token forwards, at batch 1 (cost model)."""
    one = predict_forward(graph, target, 1, 1, context)
    return predict_forward(graph, target, 1, draft + 1, context) / one


def draft_step_cost(graph: ModelGraph, target: HardwareSpec, skipped: Collection[int], context: int) -> float:
    """A one-token step with blocks `skipped` bypassed, in one-token steps of the full model (cost model: the
    captured graph without those blocks' linears and attention; their glue ops stay counted, a slight
    over-estimate of the drafting step)."""
    kept = dataclasses.replace(graph, linears=[s for s in graph.linears if s.block not in skipped],
                               attentions=[a for a in graph.attentions if a.block not in skipped])
    return predict_forward(kept, target, 1, 1, context) / predict_forward(graph, target, 1, 1, context)


def iteration_cost(graph: ModelGraph, target: HardwareSpec, cfg: SpeculativeConfig, draft: int,
                   skipped: Collection[int] = ()) -> float:
    """One drafting iteration in one-token steps: the verify, plus `draft` drafting steps for self_draft."""
    ratio = verify_cost(graph, target, draft, cfg.context)
    if cfg.proposer == "self_draft":
        ratio += draft * draft_step_cost(graph, target, skipped, cfg.context)
    return ratio


@register_pass
class SpeculativePass(Pass):
    name = "speculative"
    changes_forward = False
    config_cls = SpeculativeConfig
    runs_after = ("quantize", "kv_cache")
    needs_calibration = True

    def candidates(self, graph: ModelGraph, target: HardwareSpec) -> list[Candidate]:
        from optpass.cost_models.model_cost import model_estimate

        cfg = self.config
        label = f"{cfg.proposer} draft {cfg.draft}"
        if graph.model_kind != "causal_lm":
            return [Candidate.skip(self.name, (), "speculative decoding needs a causal LM", label)]
        planned = range(round(max(cfg.skip_shares) * len(graph.blocks)))  # before the search: the largest share
        ratio = iteration_cost(graph, target, cfg, cfg.draft, planned)
        step = predict_forward(graph, target, 1, 1, cfg.context)
        # per generated token: one step without drafting, ratio / expected tokens with it
        est = model_estimate(graph, target, d_latency=graph.example_tokens * step * (ratio / cfg.expected_tokens - 1))
        return [Candidate(self.name, (), {"verify_cost": ratio}, est, label=label, paths=("module",))]

    def apply(self, model: nn.Module, chosen: list[Candidate], context: ApplyContext) -> PassResult:
        from optpass.backends.runtime import DecodeEngine, DecodePlan

        from optpass.backends.cpu import gemv_ops

        cfg = self.config
        ratio, draft, options, search = float(chosen[0].params["verify_cost"]), cfg.draft, {}, {}
        if cfg.proposer == "self_draft":
            if context.graph is None or decoder_layers(model) is None:
                return PassResult(self.name, model, False, reason="self-drafting needs the captured graph and a "
                                  "`model.layers` list of decoder blocks to skip")
            found = search_self_draft(model, context.calibration, context.graph, context.target, cfg)
            best, search = found["best"], found["details"]
            if best.speedup <= 1.0:
                return PassResult(self.name, model, False, details=search, reason=(
                    f"self-drafting does not pay here: the best setting (skip {best.skipped} blocks, draft "
                    f"{best.draft}) is accepted {best.alpha:.0%} per token, {best.tokens:.2f} tokens per verify, at a "
                    f"predicted {best.cost:.2f} one-token steps per iteration ({best.speedup:.2f}x)"))
            ratio, draft, options = best.cost, best.draft, {"layers": found["layers"]}
        # rows one verify step may take (batch x (draft + 1)): the weight-streaming decode kernels' row budget
        proposer = {"kind": cfg.proposer, "draft": draft, "verify_cost": ratio, "max_rows": gemv_ops.MAX_ROWS,
                    **options}
        plan = DecodePlan(compiled_step=True, max_cache_len=cfg.max_cache_len, proposer=proposer)
        prompt = _check_prompt(model, context.calibration)
        engine = DecodeEngine(model, plan, compile=False)
        plain = engine.generate(prompt, CHECK_TOKENS, speculate=False)
        drafted = engine.generate(prompt, CHECK_TOKENS)
        stats = dict(engine.last_timing)
        if not torch.equal(plain, drafted):
            first = int((plain != drafted).any(0).nonzero()[0]) - prompt.shape[1]
            return PassResult(self.name, model, False, reason=f"decoding with {cfg.proposer} diverged from plain "
                              f"decoding at generated token {first}: not lossless here, rolled back")
        details = {"proposer": proposer, "lossless_check": f"{CHECK_TOKENS} greedy tokens identical",
                   "check_verify_steps": stats["verify_steps"], "check_accepted_drafts": stats["accepted_drafts"],
                   **search}
        # grounded prompts are long: the static cache's cap is this pass's (it also compiles the step)
        runtime = {"compiled_step": True, "max_cache_len": cfg.max_cache_len, "proposer": proposer}
        return PassResult(self.name, model, True, (), details=details, runtime=runtime)

    def restore(self, model: nn.Module, state: dict[str, Any]) -> nn.Module:
        """Nothing to rebuild: the proposer (for self_draft, its skipped blocks) is in the checkpoint's decode
        plan, and the runtime installs a drafter's block switches on first use."""
        return model


def search_self_draft(model: nn.Module, calibration: list[Any], graph: ModelGraph, target: HardwareSpec,
                      cfg: SpeculativeConfig) -> dict[str, Any]:
    """The skip set and draft length with the highest predicted speedup: blocks ranked by ShortGPT influence on
    the calibration batches, the teacher-forced acceptance measured per share skipped on the model's own greedy
    continuations of calibration prompts, weighed against the cost model's drafting and verify costs. {"best": DraftSetting, "layers": skipped blocks, "details": for the report}."""
    from optpass.backends.runtime.self_draft import acceptance, best_setting, own_continuations

    started = time.perf_counter()
    batches = token_batches(calibration)
    if not batches:
        raise ConfigError("self_draft needs token calibration batches to measure its acceptance")
    blocks = len(decoder_layers(model))
    influence = block_influence(model, batches)
    order = sorted(range(blocks), key=lambda i: influence[i])
    counts = sorted({max(1, min(blocks - 1, round(share * blocks))) for share in cfg.skip_shares})
    prompt = min(SEARCH_PROMPT, batches[0]["input_ids"].shape[1])
    alphas = acceptance(model, own_continuations(model, batches, prompt, SEARCH_NEW), order, counts, first=prompt - 1)
    best, table = best_setting(alphas, range(1, cfg.draft + 1),
                               lambda n: draft_step_cost(graph, target, set(order[:n]), cfg.context),
                               lambda k: verify_cost(graph, target, k, cfg.context))
    layers = sorted(order[:best.skipped])
    details = {"self_draft": {"skip_order": order, "acceptance": {str(n): round(a, 4) for n, a in alphas.items()},
                              "chosen": {**best.to_dict(), "layers": layers},
                              "settings": [s.to_dict() for s in table], "search_s": round(time.perf_counter() - started, 1)}}
    return {"best": best, "layers": layers, "details": details}


def _check_prompt(model: nn.Module, calibration: list[Any]) -> torch.Tensor:
    """A calibration prompt whose second half repeats its first (so drafts are proposed and verified)."""
    batches = token_batches(calibration)
    if batches:
        half = batches[0]["input_ids"][:1, :48]
    else:
        half = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(5))
    return torch.cat([half, half[:, : half.shape[1] // 2]], dim=1)
