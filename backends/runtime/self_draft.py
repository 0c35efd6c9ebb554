"""Self-speculative drafting (Draft & Verify / SWIFT style, no training): the model drafts its own next k tokens
with some of its decoder blocks skipped, and the full model verifies them in one forward.

Draft and verify share one cache. A drafting step runs the engine's compiled one-token step with the drafter's
blocks forced off (`_forcible_forward`: the identity on the residual stream), so the blocks that run write their
keys and values at the drafted positions and the skipped ones write nothing. The engine crops those writes
before the verify step (`kv.cache.rollback` of just the blocks that ran), and the verify step writes every
block's entries for the same positions from the full model: the prompt is never recomputed and no drafted
entry survives into the verified cache.

Which blocks to skip is searched on calibration text (`acceptance`): blocks are tried in the order of their
ShortGPT influence (the least a block changes the residual stream, the first it is skipped), and for each
count the teacher-forced agreement of the skipped model's argmax with the full model's, over the model's own
greedy continuations of calibration prompts (`own_continuations`: the text a drafter meets), is the per-token
acceptance. `best_setting` weighs the tokens a verify step emits at that acceptance against the predicted
cost of k drafting steps plus the verify, and says whether any setting pays.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

FORCED = "forced_skip"  # the flag `skip_schedule._scheduled_forward` and `_forcible_forward` both honour


def _forcible_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """The block's own forward, or the identity on the residual stream while it is forced off (a drafting step)."""
    if self.forced_skip:
        return hidden_states
    return type(self).forward(self, hidden_states, *args, **kwargs)


@contextlib.contextmanager
def skipping(layers: nn.ModuleList, indices: Sequence[int]) -> Iterator[None]:
    """`layers[indices]` forced off inside the block. The switch is an instance-level `forward` (as the layer-skip
    schedule's), put in for the block and taken out after it, so the model is left as it was: a compiled step
    traced inside keeps the blocks off, one traced outside runs them."""
    added = [i for i in indices if FORCED not in layers[i].__dict__]  # a scheduled block already has the switch
    for i in added:
        layers[i].forward = types.MethodType(_forcible_forward, layers[i])
    for i in indices:
        layers[i].forced_skip = True
    try:
        yield
    finally:
        for i in indices:
            layers[i].forced_skip = False
        for i in added:
            del layers[i].__dict__["forward"], layers[i].__dict__[FORCED]


@dataclass
class SelfDraft:
    """A proposer whose drafts come from the model itself, `layers` skipped. The engine binds `step`
    (token [B, 1], offset from the first drafted position) -> the drafting step's argmax [B], and undoes the
    cache writes of the `steps_run` drafting steps after each proposal."""

    layers: Sequence[int]
    runs_model = True
    step: Callable[[torch.Tensor, int], torch.Tensor] | None = field(default=None, repr=False)
    steps_run: int = 0

    def bind(self, step: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
        self.step = step

    def propose(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        assert self.step is not None, "SelfDraft.propose before the engine bound its drafting step"
        token, draft = ids[:, -1:], []
        for offset in range(k):
            token = self.step(token, offset)[:, None]
            draft.append(token)
        self.steps_run = k
        return torch.cat(draft, dim=1)

    def observe(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        pass


@torch.no_grad()
def own_continuations(model: nn.Module, batches: list[dict[str, Any]], prompt: int, new: int) -> list[dict[str, Any]]:
    """The batches' first `prompt` tokens, as one batch, followed by the model's own `new` greedy tokens
    (transformers' loop): what a drafter meets in decoding, where the model's own choice is usually clearer than
    on corpus text."""
    ids = torch.cat([b["input_ids"][:, :prompt] for b in batches])
    mask = torch.cat([b["attention_mask"][:, :prompt] if b.get("attention_mask") is not None
                      else torch.ones_like(b["input_ids"][:, :prompt]) for b in batches])
    full = type(model).generate(model, input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
    return [{"input_ids": full, "attention_mask": torch.cat([mask, torch.ones_like(full[:, prompt:])], dim=1)}]


@torch.no_grad()
def acceptance(model: nn.Module, batches: list[dict[str, Any]], order: list[int], counts: Sequence[int],
               first: int = 0) -> dict[int, float]:
    """{blocks skipped: share of unpadded positions from `first` on where the model with the first `count` blocks
    of `order` skipped picks the full model's greedy token} (teacher forced: both read the same text)."""
    from optpass.passes.layer_skip import decoder_layers

    layers = decoder_layers(model)
    out: dict[int, float] = {}
    reference = [model(**b).logits.argmax(-1) for b in batches]
    for count in counts:
        agree = total = 0
        with skipping(layers, order[:count]):
            for batch, want in zip(batches, reference):
                got = model(**batch).logits.argmax(-1)
                keep = batch.get("attention_mask", torch.ones_like(want)).bool().clone()
                keep[:, :first] = False
                agree += int(((got == want) & keep).sum())
                total += int(keep.sum())
        out[count] = agree / max(total, 1)
    return out


def tokens_per_verify(alpha: float, k: int) -> float:
    """Expected tokens a verify step emits (accepted drafts + the model's own) when each drafted token is accepted
    with probability `alpha` given the earlier ones were: 1 + alpha + ... + alpha^k."""
    return float(sum(alpha ** i for i in range(k + 1)))


@dataclass(frozen=True)
class DraftSetting:
    skipped: int  # blocks skipped while drafting
    draft: int  # tokens drafted per verify
    alpha: float  # per-token acceptance measured for `skipped`
    tokens: float  # tokens per verify step at that acceptance
    cost: float  # predicted time of k drafting steps + the verify, in one-token steps
    speedup: float  # tokens / cost

    def to_dict(self) -> dict[str, float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def best_setting(alphas: dict[int, float], drafts: Sequence[int], draft_cost: Callable[[int], float],
                 verify_cost: Callable[[int], float]) -> tuple[DraftSetting, list[DraftSetting]]:
    """The (blocks skipped, draft length) with the highest predicted speedup, and every setting weighed.
    `draft_cost(skipped)` and `verify_cost(k)` are in one-token steps of the full model."""
    table = []
    verify = {k: verify_cost(k) for k in drafts}
    for skipped, alpha in alphas.items():
        step = draft_cost(skipped)  # one cost-model evaluation per skip set, not per draft length
        for k in drafts:
            tokens = tokens_per_verify(alpha, k)
            cost = k * step + verify[k]
            table.append(DraftSetting(skipped, k, alpha, tokens, cost, tokens / cost))
    return max(table, key=lambda s: s.speedup), table
