"""The decode engine: a static-shape cache, a compiled one-token step, and the generation loop over it.

At SmolLM2's size a decode step is dominated by per-token overhead, not bytes: transformers' `generate()` loop,
dynamo guard evaluation and Python dispatch each cost milliseconds. The engine keeps one static cache per
(batch, length bucket), compiles the step (tokens -> logits) once per bucket with Inductor (freezing on, so
weights become constants), skips guard evaluation on the hot loop, and runs a minimal loop; prefill runs eager
(its shapes vary) and computes the head at the last position only. Left-padded batches carry a static
[B, L] attention mask and per-row positions. The cache layout comes from the `DecodePlan`: transformers'
`StaticCache` (optpass rings for sliding-window layers) or the compressed fixed-budget cache.

Because the compiled step freezes weights and skips guards, the engine fingerprints the parameters (identity
and version counter) when it compiles and recompiles if they changed: it never decodes with stale weights.
"""

from __future__ import annotations

import itertools
import time
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from optpass.backends.runtime.plan import DecodePlan
from optpass.hf_compat import last_logits_only, with_cache

MIN_BUCKET = 256
KV_CONTEXT_BUCKET = 256  # compressed caches: budgets follow the prompt length rounded up to this
_STEP_IDS = itertools.count()


def _own_code(fn: types.FunctionType) -> types.FunctionType:
    """A copy of `fn` with its own code object. Dynamo caches compiled graphs per code object, and with guards
    skipped nothing would tell two engines' (or two buckets') steps apart: each must have its own code."""
    code = fn.__code__.replace(co_name=f"optpass_decode_step_{next(_STEP_IDS)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


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
    """Static caches (one per batch x length bucket) and a compiled step each; `generate` is the loop."""

    def __init__(self, model: nn.Module, plan: DecodePlan, compile: bool = True) -> None:
        self.model, self.plan, self._compile = model, plan, compile and plan.compiled_step
        self.kv_settings = plan.kv_settings()
        self._buckets: dict[tuple, tuple[Any, Callable, bool]] = {}
        self._weights: tuple | None = None
        self.cache: Any = None
        self.last_timing: dict[str, float] = {}

    def fits(self, prompt: int, new: int) -> bool:
        return self.kv_settings is not None or prompt + new <= self.plan.max_cache_len

    def _new_cache(self, batch: int, prompt: int, needed: int) -> tuple[tuple, Callable[[], Any], int | None]:
        """(bucket key, cache factory, the length of the static attention mask steps pass, or None)."""
        from optpass.backends.kv import enable_compressed_attention
        from optpass.backends.kv.cache import CompressedKVCache, has_sliding_layers, static_cache

        config = self.model.config
        if self.kv_settings is not None or has_sliding_layers(config):
            enable_compressed_attention(self.model)  # optpass's cache layers attend through optpass
        if self.kv_settings is not None:
            context = -(-prompt // KV_CONTEXT_BUCKET) * KV_CONTEXT_BUCKET
            # optpass's layers mask padding by their own slot validity: steps pass no mask
            return (batch, "kv", context), lambda: CompressedKVCache(self.kv_settings, config, context), None
        length = cache_bucket(needed, self.plan.max_cache_len)
        return (batch, length), lambda: static_cache(config, length), length

    def _select(self, batch: int, prompt: int, needed: int) -> tuple[Callable, int | None]:
        """Make the cache of this (batch, bucket) current; return its step function and its mask length."""
        if self._compile:
            weights = _fingerprint(self.model)
            if self._weights is not None and weights != self._weights:
                warnings.warn("optpass: the model's weights changed after its decode step was compiled; recompiling "
                              "(the compiled step freezes weights)", stacklevel=4)
                self._buckets.clear()
            self._weights = weights
        key, make_cache, masked = self._new_cache(batch, prompt, needed)
        if key not in self._buckets:
            cache = make_cache()
            model = self.model

            def step(tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                     cache: Any = cache) -> tuple[torch.Tensor, torch.Tensor]:
                logits = model(input_ids=tokens, **with_cache(model, cache), attention_mask=mask, position_ids=positions,
                               use_cache=True).logits[:, -1].float()
                return logits, logits.argmax(-1)

            if self._compile:
                options = {"freezing": True, "cpp_wrapper": True,
                           # the step's inputs keep their shapes and its cache its storage: no guard can fail
                           "guard_filter_fn": torch.compiler.skip_all_guards_unsafe}
                step = torch.compile(_own_code(step), fullgraph=True, dynamic=False, options=options)
            self._buckets[key] = (cache, step, masked)
        self.cache, step_fn, masked = self._buckets[key]
        return step_fn, masked

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, new: int, attention_mask: torch.Tensor | None = None,
                 choose: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 eos: list[int] | None = None, pad: int | None = None,
                 stop: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Prompt + up to `new` tokens, [B, S + n], as transformers' loop returns them: rows that finished (EOS or
        `stop`) continue with `pad`, and the loop ends when every row has. `choose(ids, logits, argmax)` picks
        the next tokens (default: greedy)."""
        batch, prompt = ids.shape
        if not self.fits(prompt, new):
            raise ValueError(f"prompt {prompt} + {new} new tokens exceeds the static cache ({self.plan.max_cache_len})")
        step, mask_length = self._select(batch, prompt, prompt + new)
        self.cache.reset()
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
        out = ids
        unfinished = torch.ones(batch, dtype=torch.bool)
        argmax = logits.argmax(-1)
        for i in range(new):
            token = choose(out, logits, argmax) if choose is not None else argmax
            if pad is not None:
                token = torch.where(unfinished, token, torch.full_like(token, pad))
            out = torch.cat([out, token[:, None]], dim=1)
            if eos_t.numel():
                unfinished &= ~(token[:, None] == eos_t).any(-1)  # torch.isin: ~0.8 ms a call here
            if stop is not None:
                unfinished &= ~stop(out)
            if i + 1 == new or not bool(unfinished.any()):
                break
            if step_mask is not None:
                step_mask[:, prompt + i] = 1
            logits, argmax = step(token[:, None], valid.clone(), step_mask)
            valid += 1
        self.last_timing = {"prefill_s": prefilled - started, "decode_s": time.perf_counter() - prefilled,
                            "decode_steps": out.shape[1] - prompt - 1}
        return out
