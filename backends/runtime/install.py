"""The one place that wraps a model's `generate()`: `install_runtime(model, plan)`, called by the pass manager's
caller after every pass has run (and by `optpass.load`).

A call the decode engine honours exactly (greedy or sampling with the supported options, batch with left
padding, EOS lists, stop strings, several return sequences) takes the compiled path. Any other call goes to
transformers' own loop, with the plan's cache layout (a compressed cache still compresses), and the reason is
counted in `model.optpass_runtime.fallbacks` and warned about once.
"""

from __future__ import annotations

import copy
import types
import warnings
from collections import Counter
from typing import Any

import torch
from torch import nn

from optpass.backends.runtime import sampler
from optpass.backends.runtime.engine import DecodeEngine
from optpass.backends.runtime.plan import DecodePlan
from optpass.backends.runtime.request import parse
from optpass.backends.runtime.verify import TokenChoice
from optpass.hf_compat import cache_kwarg


class DecodeRuntime:
    """What `model.generate` consults: the plan, the engine (when the plan compiles a step), fallback counts."""

    def __init__(self, model: nn.Module, plan: DecodePlan) -> None:
        self.plan = plan
        self.engine = DecodeEngine(model, plan) if plan.compiled_step else None
        self.fallbacks: Counter[str] = Counter()
        self.fast_calls = 0

    def __deepcopy__(self, memo: dict) -> DecodeRuntime:
        """A copied model gets a fresh runtime (its own caches; it compiles on first use)."""
        model = copy.deepcopy(self.engine.model, memo) if self.engine is not None else None
        fresh = DecodeRuntime.__new__(DecodeRuntime)
        fresh.plan, fresh.fallbacks, fresh.fast_calls = self.plan, Counter(), 0
        fresh.engine = DecodeEngine(model, self.plan) if model is not None else None
        return fresh

    def fallback(self, reason: str) -> None:
        if reason not in self.fallbacks:
            warnings.warn(f"optpass: this generate() call runs transformers' own loop, not the compiled decode step: "
                          f"{reason}", stacklevel=4)
        self.fallbacks[reason] += 1

    def generate(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        user_cache = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
        if self.engine is not None:
            request, why = parse(model, args, kwargs) if not user_cache else (None, "a cache was passed in")
            if request is not None and not self.engine.fits(request.input_ids.shape[1], request.new_tokens):
                request, why = None, f"prompt + new tokens exceed the static cache ({self.plan.max_cache_len})"
            if request is not None:
                self.fast_calls += 1
                return self._fast(request)
            self.fallback(why)
        if self.plan.kv is not None and not user_cache:
            from optpass.backends.kv import CompressedKVCache

            kwargs = {**kwargs, cache_kwarg(model): CompressedKVCache(self.plan.kv_settings(), model.config)}
        return type(model).generate(model, *args, **kwargs)

    def _fast(self, request: Any) -> torch.Tensor:
        config = request.config
        choice = TokenChoice(sampler.processors(config, request.input_ids.shape[1], request.eos), bool(config.do_sample))
        stop = None
        if config.stop_strings:
            from transformers import StopStringCriteria

            criterion = StopStringCriteria(tokenizer=request.tokenizer, stop_strings=config.stop_strings)

            def stop(ids: torch.Tensor) -> torch.Tensor:
                return criterion(ids, None)
        return self.engine.generate(request.input_ids, request.new_tokens, request.attention_mask, choice,
                                    request.eos, request.pad, stop)


def _generate(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """`generate()` through optpass's decode runtime (see `backends/runtime/install.py`)."""
    return self.optpass_runtime.generate(self, args, kwargs)


def install_runtime(model: nn.Module, plan: DecodePlan) -> nn.Module:
    """Attach the runtime for `plan` and route `model.generate` through it (instance attributes, so `deepcopy`
    carries them). An empty plan changes nothing."""
    if plan.empty or not hasattr(model, "generate"):
        return model
    model.optpass_runtime = DecodeRuntime(model, plan)
    model.generate = types.MethodType(_generate, model)
    return model


def runtime_plan(model: nn.Module) -> DecodePlan | None:
    runtime = getattr(model, "optpass_runtime", None)
    return runtime.plan if runtime is not None else None
