"""The decode engine: a static-shape cache, a compiled one-token step, and the generation loop over it.

At SmolLM2's size a decode step is dominated by per-token overhead, not bytes: transformers' `generate()` loop,
dynamo guard evaluation and Python dispatch each cost milliseconds. The engine keeps one static cache per
(batch, length bucket), compiles the step (tokens -> logits) once per bucket with Inductor (freezing on, so
weights become constants), skips guard evaluation on the hot loop, and runs a minimal loop; prefill runs eager
(its shapes vary), attends over the prompt's own keys only (`PromptFirstLayer`) and computes the head at the
last position only. Left-padded batches carry a static [B, L] attention mask and per-row positions. The cache
layout comes from the `DecodePlan`: transformers' static layers (optpass rings for sliding-window layers) or the
compressed fixed-budget cache.

With a proposer in the plan (prompt lookup, token recycling) the engine also compiles a verify step that scores
the last token and k drafted ones in one forward (at batch 1 a step is bound by reading weights, so k + 1 rows
cost little more than one), keeps what `verify.accept` accepts and rolls the cache back past the first
rejection (`Cache.crop`); `gate.DraftGate` turns drafting off where it does not pay. A compressed cache evicts as
tokens arrive and cannot be cropped: its state is copied before a verify step and, on a rejection, put back and
the accepted tokens re-run (a rejected verify then costs about two steps; the gate sees that time).

A self-drafting proposer (`self_draft.py`) drafts with the model itself: the engine binds it a drafting step (the
compiled one-token step traced with the drafter's blocks forced off), and before the verify step crops what
those steps wrote in the blocks that ran (or restores a compressed cache's saved state).

With a layer-skip schedule in the plan (`backends/skip_schedule.py`) each step forces off the blocks every row
is past the threshold of, and a compiled graph is kept per such stage (at most one per scheduled block + 1).

Because the compiled step freezes weights and skips guards, the engine fingerprints the parameters (identity
and version counter) when it compiles and recompiles if they changed: it never decodes with stale weights.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from optpass.backends.kv.attention import decode_steps
from optpass.backends.own_code import own_code
from optpass.backends.runtime.gate import DraftGate
from optpass.backends.runtime.plan import DecodePlan
from optpass.backends.runtime.proposers import Proposer, make_proposer
from optpass.backends.runtime.verify import TokenChoice
from optpass.hf_compat import last_logits_only, with_cache

MIN_BUCKET = 256
KV_CONTEXT_BUCKET = 256  # compressed caches: budgets follow the prompt length rounded up to this
# a plan's proposer entries the engine reads (the others are the proposer's own options); "gated": False drafts at
# every step whatever it measures (benchmarks use it to measure a drafter's acceptance)
ENGINE_KEYS = ("kind", "draft", "verify_cost", "max_rows", "gated")
DRAFT_STAGE = "draft"  # the compiled one-token step a self-drafting proposer runs with its blocks forced off


def cache_bucket(needed: int, max_cache_len: int) -> int:
    """The static cache length for a call: the smallest power of two >= `needed` (at least MIN_BUCKET).
    Each decode step attends over the whole static cache, so a 1024-slot cache for a 192-token call
    would read 4x the KV bytes; buckets bound that waste at 2x while keeping shapes static."""
    bucket = MIN_BUCKET
    while bucket < needed:
        bucket *= 2
    return min(bucket, max_cache_len)


def _fingerprint(model: nn.Module) -> tuple:
    return tuple((id(t), t._version) for t in itertools.chain(model.parameters(), model.buffers()))


class DecodeEngine:
    """Static caches (one per batch x length bucket) with a compiled step per width (1, and k + 1 to verify a
    draft); `generate` is the loop."""

    def __init__(self, model: nn.Module, plan: DecodePlan, compile: bool = True) -> None:
        self.model, self.plan, self._compile = model, plan, compile and plan.compiled_step
        self.kv_settings = plan.kv_settings()
        self.skip = {int(k): int(v) for k, v in (plan.skip or {}).items()}
        self._buckets: dict[tuple, tuple[Any, dict[int, Callable], int | None]] = {}
        self._weights: tuple | None = None
        self.cache: Any = None
        self.last_timing: dict[str, float] = {}
        # per (batch size, proposer kind): a drafting iteration's time in one-token steps, as the last call that
        # drafted measured it.
        # The plan's ratio is a batch-1 estimate; at larger batches a verify has fewer drafts (row budget) and
        # costs relatively more. A call starts its gate from this; where it says even full acceptance cannot
        # pay, the gate starts off and only probes (a stale or compile-inflated figure costs a probe, no more)
        self.verify_cost_seen: dict[tuple[int, str], float] = {}
        self.step_was_new = False  # set when a step graph is made: its first call compiles and is not timed
        self.gate_waited: dict[tuple[int, str], int] = {}  # per (batch, kind): plain steps a gate ended off waited

    @property
    def draft(self) -> int:
        """Tokens the plan's proposer drafts per verify (0: no proposer)."""
        return int(self.plan.proposer["draft"]) if self.plan.proposer else 0

    def fits(self, prompt: int, new: int) -> bool:
        return self.kv_settings is not None or prompt + new <= self.plan.max_cache_len

    def proposer(self, batch: int, prompt: int, new: int) -> tuple[Proposer | None, str]:
        """The plan's proposer for this call, or (None, why not)."""
        if not self.draft:
            return None, "no proposer in the plan"
        if self.skip:
            return None, "a layer-skip schedule: a rejected draft cannot be rolled back in blocks that did not run"
        if prompt + new + self.draft > self.plan.max_cache_len:
            return None, "no room in the static cache for a draft"
        if self.draft_length(batch) < 1:
            return None, f"batch {batch} leaves no room for a draft in the decode kernels' {self._rows()} rows"
        options = {k: v for k, v in self.plan.proposer.items() if k not in ENGINE_KEYS}
        return make_proposer(self.plan.proposer["kind"], self.model.config.vocab_size, **options), ""

    def _rows(self) -> int:
        return int(self.plan.proposer.get("max_rows", 8))

    def draft_length(self, batch: int) -> int:
        """Drafted tokens per verify step at this batch: the plan's k, capped so that batch x (k + 1) rows stay
        within the decode kernels' row budget (`max_rows`; more rows fall to a GEMM path that dequantizes the
        weights per call, slower than the weight-streaming kernel it replaces)."""
        return min(self.draft, self._rows() // batch - 1)

    def _new_cache(self, batch: int, prompt: int, needed: int, slack: int) -> tuple[tuple, Callable[[], Any], int | None]:
        """(bucket key, cache factory, the length of the static attention mask steps pass, or None)."""
        from optpass.backends.cpu import gemv_ops
        from optpass.backends.kv import enable_compressed_attention
        from optpass.backends.kv.cache import CompressedKVCache, has_sliding_layers, static_cache
        from optpass.hf_compat import linear_layers, local_layers

        config = self.model.config
        sliding = has_sliding_layers(config)
        # optpass's cache layers attend through optpass; so do the steps, with optpass's decode kernel where it
        # is built (`decode_steps`), and verify steps in any case (row-exact)
        kernels = gemv_ops.available()  # loads the kernels here, never first inside a step's trace
        if self.kv_settings is not None or sliding or slack or kernels:
            enable_compressed_attention(self.model)
        if self.kv_settings is not None:
            context = -(-prompt // KV_CONTEXT_BUCKET) * KV_CONTEXT_BUCKET
            # optpass's layers mask padding by their own slot validity: steps pass no mask
            return (batch, "kv", context), lambda: CompressedKVCache(self.kv_settings, config, context), None
        length = cache_bucket(needed + slack, self.plan.max_cache_len)  # a verify step writes k slots past the end
        # layers made local (or hybrid) after this engine was built need other cache layers
        local = tuple(sorted(local_layers(config).items())), tuple(sorted(linear_layers(config)))
        # only ring (sliding-window) layers keep slack slots; without them drafting and plain calls share one
        # cache and one compiled one-token step (two 2k-slot caches at batch 4 are ~750 MB for SmolLM2)
        ring_slack = slack if sliding else 0
        return (batch, length, ring_slack, local), lambda: static_cache(config, length, ring_slack), length

    def _make_step(self, cache: Any) -> Callable:
        model = self.model

        def step(tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                 cache: Any = cache) -> tuple[torch.Tensor, torch.Tensor]:
            logits = model(input_ids=tokens, **with_cache(model, cache), attention_mask=mask, position_ids=positions,
                           use_cache=True).logits.float()
            return logits, logits.argmax(-1)

        if not self._compile:
            return step
        options = {"freezing": True, "cpp_wrapper": True,
                   # the step's inputs keep their shapes and its cache its storage: no guard can fail
                   "guard_filter_fn": torch.compiler.skip_all_guards_unsafe}
        # own code: with guards skipped nothing would tell two engines' (or two buckets') steps apart
        return torch.compile(own_code(step, "optpass_decode_step"), fullgraph=True, dynamic=False, options=options)

    def _select(self, batch: int, prompt: int, needed: int, slack: int = 0) -> tuple[Callable[..., Callable], int | None]:
        """Make the cache of this (batch, bucket) current; return `step_for(width, stage)` and the mask length."""
        if self._compile:
            weights = _fingerprint(self.model)
            if self._weights is not None and weights != self._weights:
                warnings.warn("optpass: the model's weights changed after its decode step was compiled; recompiling "
                              "(the compiled step freezes weights)", stacklevel=4)
                self._buckets.clear()
            self._weights = weights
        key, make_cache, masked = self._new_cache(batch, prompt, needed, slack)
        if key not in self._buckets:
            self._buckets[key] = (make_cache(), {}, masked)
        self.cache, steps, masked = self._buckets[key]

        def step_for(width: int, stage: int = 0) -> Callable:
            if (width, stage) not in steps:  # each width and skip stage its own compiled graph (guards are skipped)
                steps[width, stage] = self._make_step(self.cache)
                self.step_was_new = True
            return steps[width, stage]

        return step_for, masked

    def _skip_stage(self, first_position: int | None) -> int:
        """Force off the scheduled blocks every row of the next step skips; the stage keys the compiled graph."""
        from optpass.backends.skip_schedule import set_positions, stage
        from optpass.passes.layer_skip import decoder_layers

        set_positions(decoder_layers(self.model), first_position)
        return stage(self.skip, first_position) if first_position is not None else 0

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, new: int, attention_mask: torch.Tensor | None = None,
                 choice: TokenChoice | None = None, eos: list[int] | None = None, pad: int | None = None,
                 stop: Callable[[torch.Tensor], torch.Tensor] | None = None, speculate: bool = True) -> torch.Tensor:
        """Prompt + up to `new` tokens, [B, S + n], as transformers' loop returns them: rows that finished (EOS or
        `stop`) continue with `pad`, and the loop ends when every row has. `choice` picks the next tokens
        (default: greedy); with `speculate` and a proposer in the plan, drafts are verified k at a time."""
        from optpass.backends.kv.cache import restore, rollback, snapshot

        batch, prompt = ids.shape
        if not self.fits(prompt, new):
            raise ValueError(f"prompt {prompt} + {new} new tokens exceeds the static cache ({self.plan.max_cache_len})")
        choice = choice or TokenChoice()
        proposer, self.no_draft_reason = self.proposer(batch, prompt, new) if speculate else (None, "not asked")
        k = self.draft_length(batch) if proposer is not None else 0
        step_for, mask_length = self._select(batch, prompt, prompt + new, k)
        gate = None
        if proposer is not None:  # starts from what this batch size measured before, else the plan's estimate
            gate_key = (batch, self.plan.proposer["kind"])
            seen = self.verify_cost_seen.get(gate_key)
            ratio = seen if seen is not None else float(self.plan.proposer.get("verify_cost", 1.5))
            gate = DraftGate(ratio, start_off=ratio >= k + 1, waited=self.gate_waited.get(gate_key, 0),
                             always=not self.plan.proposer.get("gated", True))
        self.cache.reset()
        if self.skip:  # the prefill decides per token (eager); steps force off what the whole batch skips
            self._skip_stage(None)
        eos_t = torch.tensor(eos or [], dtype=torch.long)
        started = time.perf_counter()
        prefill_kwargs: dict[str, Any] = {}
        if attention_mask is not None:
            positions = attention_mask.long().cumsum(-1) - 1
            positions.masked_fill_(attention_mask == 0, 1)
            prefill_kwargs = {"attention_mask": attention_mask, "position_ids": positions}
        logits = self.model(input_ids=ids, **with_cache(self.model, self.cache), use_cache=True, **prefill_kwargs,
                            **last_logits_only(self.model)).logits[:, -1].float()
        prefilled = time.perf_counter()
        valid = attention_mask.long().sum(-1, keepdim=True) if attention_mask is not None else \
            torch.full((batch, 1), prompt, dtype=torch.long)
        step_mask = None
        if mask_length is not None:  # the static cache's positions: prompt (padding 0), then each new token
            step_mask = torch.zeros(batch, mask_length, dtype=torch.long)
            step_mask[:, :prompt] = attention_mask if attention_mask is not None else 1
        out, cached = ids, prompt  # `cached`: tokens in the cache (every emitted token but the last)
        unfinished = torch.ones(batch, dtype=torch.bool)
        pending = choice.next(ids, logits, logits.argmax(-1))[:, None]  # tokens to emit
        verifies = accepted = 0
        self_drafting = getattr(proposer, "runs_model", False)
        if self_drafting:
            from optpass.backends.runtime.self_draft import skipping
            from optpass.passes.layer_skip import decoder_layers

            blocks = decoder_layers(self.model)

            def draft_step(token: torch.Tensor, offset: int) -> torch.Tensor:
                """One drafting step at the offset-th position past the cache, the drafter's blocks off."""
                if step_mask is not None:
                    step_mask[:, cached + offset] = 1
                with skipping(blocks, proposer.layers), decode_steps():
                    _, drafted = step_for(1, DRAFT_STAGE)(token.contiguous(), valid + offset, step_mask)
                return drafted[:, -1]
            proposer.bind(draft_step)

        def done() -> bool:
            return out.shape[1] - prompt == new or not bool(unfinished.any())

        while True:
            for token in pending.unbind(1):
                if pad is not None:
                    token = torch.where(unfinished, token, torch.full_like(token, pad))
                out = torch.cat([out, token[:, None]], dim=1)
                if eos_t.numel():
                    unfinished &= ~(token[:, None] == eos_t).any(-1)  # torch.isin: ~0.8 ms a call here
                if stop is not None:
                    unfinished &= ~stop(out)
                if done():
                    break
            if done():
                break
            remaining = new - (out.shape[1] - prompt)
            t0 = time.perf_counter()  # the gate weighs whole iterations: proposing, verifying, rolling back
            self.step_was_new = False
            wants = gate is not None and remaining > 1 and gate.want()
            # a compressed cache cannot crop what drafting steps evicted: its state is saved before they run
            saved = snapshot(self.cache) if wants and self_drafting and self.kv_settings is not None else None
            draft = proposer.propose(out, k) if wants else None
            if draft is not None and self_drafting:  # the verify step rewrites those positions from the full model
                if saved is not None:
                    restore(self.cache, saved)
                else:
                    rollback(self.cache, proposer.steps_run, skipped=proposer.layers)
            width = 1 if draft is None else k + 1
            # contiguous: the compiled step assumes its inputs' strides (guards are skipped)
            inputs = out[:, -1:].contiguous() if draft is None else torch.cat([out[:, -1:], draft], dim=1)
            if step_mask is not None:
                step_mask[:, cached:cached + width] = 1
            stage = self._skip_stage(int(valid.min())) if self.skip else 0
            if saved is None and draft is not None and self.kv_settings is not None:
                saved = snapshot(self.cache)
            with decode_steps():
                logits, argmax = step_for(width, stage)(inputs, valid + torch.arange(width), step_mask)
            if draft is None:
                pending = choice.next(out, logits[:, -1], argmax[:, -1])[:, None]
            else:
                pending = choice.accept(out, draft, logits, argmax, min(k, remaining - 1), unfinished)
                kept = pending.shape[1]  # the input token and the accepted drafts stay in the cache
                if saved is None:
                    rollback(self.cache, width - kept)
                elif kept < width:
                    restore(self.cache, saved)
                    with decode_steps():
                        step_for(kept, stage)(inputs[:, :kept].contiguous(), valid + torch.arange(kept), step_mask)
                if step_mask is not None:
                    step_mask[:, cached + kept:cached + width] = 0
                width = kept
                verifies, accepted = verifies + 1, accepted + kept - 1
            if gate is not None:
                proposer.observe(inputs[:, :width], logits[:, :width])
                seconds = time.perf_counter() - t0
                if not self.step_was_new:  # a compile's minutes would turn drafting off for the whole call
                    gate.record_plain(seconds) if draft is None else gate.record_verify(seconds, width)
            cached += width
            valid += width
        if self.skip:
            self._skip_stage(None)
        if gate is not None and gate.measured():
            self.verify_cost_seen[gate_key] = gate.cost()
        if gate is not None:
            self.gate_waited[gate_key] = gate.since_probe
        self.last_timing = {"prefill_s": prefilled - started, "decode_s": time.perf_counter() - prefilled,
                            "decode_steps": out.shape[1] - prompt - 1, "verify_steps": verifies,
                            "accepted_drafts": accepted}
        return out
