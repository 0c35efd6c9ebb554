"""Lossless speculative decoding with a model-free drafter: the decode runtime verifies k proposed tokens in one
forward and keeps the longest prefix the model agrees with (`backends/runtime/verify.py`), so greedy output is
token for token the model's own and sampled output has exactly its distribution.

At batch 1 a decode step is bound by reading the weights, so a forward over k + 1 tokens costs little more than
over one; drafting pays when the accepted tokens per verify exceed that cost ratio. The pass measures the ratio
with the cost model's forward formula (k + 1 rows vs 1 row at the planned context), checks on calibration text
that decoding with the drafter gives the same tokens as without (rolled back otherwise), and hands the proposer
to the runtime, whose gate (`backends/runtime/gate.py`) follows the measured times and acceptance per call and
stops drafting on text that does not repeat its input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optpass.backends.runtime.proposers import PROPOSERS
from optpass.cost_models.hardware import HardwareSpec
from optpass.cost_models.model_cost import predict_forward
from optpass.errors import ConfigError
from optpass.pass_base import ApplyContext, Candidate, Pass, PassConfig, PassResult
from optpass.registry import register_pass
from optpass.sites import ModelGraph

CHECK_TOKENS = 24  # greedy tokens compared with and without the drafter on a calibration prompt


@dataclass(frozen=True)
class SpeculativeConfig(PassConfig):
    proposer: str = "prompt_lookup"  # backends/runtime/proposers.py: prompt_lookup | token_recycling
    draft: int = 5  # tokens proposed per verify step (the verify step is compiled for draft + 1)
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


def verify_cost(graph: ModelGraph, target: HardwareSpec, draft: int, context: int) -> float:
    """A (draft + 1)-token forward's time in one-token forwards, at batch 1 (cost model)."""
    one = predict_forward(graph, target, 1, 1, context)
    return predict_forward(graph, target, 1, draft + 1, context) / one


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
        ratio = verify_cost(graph, target, cfg.draft, cfg.context)
        step = predict_forward(graph, target, 1, 1, cfg.context)
        # per generated token: one step without drafting, ratio / expected tokens with it
        est = model_estimate(graph, target, d_latency=graph.example_tokens * step * (ratio / cfg.expected_tokens - 1))
        return [Candidate(self.name, (), {"verify_cost": ratio}, est, label=label, paths=("module",))]

    def apply(self, model: nn.Module, chosen: list[Candidate], context: ApplyContext) -> PassResult:
        from optpass.backends.runtime import DecodeEngine, DecodePlan

        cfg = self.config
        ratio = float(chosen[0].params["verify_cost"])
        from optpass.backends.cpu import gemv_ops

        # rows one verify step may take (batch x (draft + 1)): the weight-streaming decode kernels' row budget
        proposer = {"kind": cfg.proposer, "draft": cfg.draft, "verify_cost": ratio, "max_rows": gemv_ops.MAX_ROWS}
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
                   "check_verify_steps": stats["verify_steps"], "check_accepted_drafts": stats["accepted_drafts"]}
        # grounded prompts are long: the static cache's cap is this pass's (it also compiles the step)
        runtime = {"compiled_step": True, "max_cache_len": cfg.max_cache_len, "proposer": proposer}
        return PassResult(self.name, model, True, (), details=details, runtime=runtime)


def _check_prompt(model: nn.Module, calibration: list[Any]) -> torch.Tensor:
    """A calibration prompt whose second half repeats its first (so drafts are proposed and verified)."""
    from optpass.passes.layer_skip import token_batches

    batches = token_batches(calibration)
    if batches:
        half = batches[0]["input_ids"][:1, :48]
    else:
        half = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(5))
    return torch.cat([half, half[:, : half.shape[1] // 2]], dim=1)
