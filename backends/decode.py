"""Static-shape compiled decode for Hugging Face causal LMs.

At SmolLM2's size a decode step is dominated by per-token overhead, not bytes: HF's `generate()` loop,
dynamo guard evaluation and Python dispatch each cost milliseconds. `StaticDecoder` keeps one
`StaticCache` (fixed shapes), compiles the one-token step (embedding -> logits -> argmax) once with
Inductor (freezing on, so weights become constants), skips guard evaluation on the hot loop, and runs a
minimal greedy loop. Prefill runs eager (its shapes vary). `install_fast_generate` routes plain greedy
`generate()` calls through it and leaves every other call to Hugging Face.
"""

from __future__ import annotations

import itertools
import time
import types
from typing import Any

import torch
from torch import nn

from optpass.hf_compat import last_logits_only, with_cache

MIN_BUCKET = 256
KV_CONTEXT_BUCKET = 256  # compressed caches: budgets follow the prompt length rounded up to this
_STEP_IDS = itertools.count()


def _own_code(fn: types.FunctionType) -> types.FunctionType:
    """A copy of `fn` with its own code object. Dynamo caches compiled graphs per code object, and with guards
    skipped nothing would tell two decoders' (or two buckets') steps apart: each must have its own code."""
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


class StaticDecoder:
    """Greedy decoding with static KV caches (one per length bucket) and a compiled one-token step each."""

    def __init__(self, model: nn.Module, max_cache_len: int = 1024, compile: bool = True) -> None:
        self.model = model
        self.max_cache_len = max_cache_len
        self._compile = compile
        self._buckets: dict[tuple, tuple[Any, Any]] = {}  # (batch, length) -> (cache, step)
        self.cache: Any = None
        self.kv_settings: Any = None  # a KVSettings: fixed-budget compressed cache instead of a StaticCache

    def __deepcopy__(self, memo: dict) -> StaticDecoder:
        """A copied model gets a fresh decoder (its own cache; it compiles on its first use)."""
        import copy

        decoder = StaticDecoder(copy.deepcopy(self.model, memo), self.max_cache_len, self._compile)
        decoder.kv_settings = self.kv_settings
        return decoder

    def _step(self, token: torch.Tensor, position: torch.Tensor, banned: torch.Tensor, cache: Any) -> torch.Tensor:
        """One greedy step; `banned` [V] masks tokens out of the argmax (EOS before `min_new_tokens`)."""
        out = self.model(input_ids=token, **with_cache(self.model, cache), cache_position=position,
                         position_ids=position.view(1, -1), use_cache=True)
        return out.logits[:, -1].masked_fill(banned, float("-inf")).argmax(-1, keepdim=True)

    def _new_cache(self, batch: int, prompt: int, needed: int) -> tuple[tuple, Any]:
        """(bucket key, a fresh cache) for a call: a StaticCache of the length bucket, or a compressed cache
        whose fixed budget follows the prompt's length bucket (so a few budgets cover every prompt)."""
        from optpass.backends.kv.cache import CompressedKVCache, has_sliding_layers, static_cache

        config = self.model.config
        if self.kv_settings is not None or has_sliding_layers(config):
            from optpass.backends.kv import enable_compressed_attention

            enable_compressed_attention(self.model)  # optpass's cache layers attend through optpass
        if self.kv_settings is not None:
            context = -(-prompt // KV_CONTEXT_BUCKET) * KV_CONTEXT_BUCKET
            return (batch, "kv", context), lambda: CompressedKVCache(self.kv_settings, config, context)
        length = cache_bucket(needed, self.max_cache_len)
        return (batch, length), lambda: static_cache(config, length)

    def _select(self, batch: int, prompt: int, needed: int) -> Any:
        """Make the cache of this (batch, bucket) current and return its step function."""
        key, make_cache = self._new_cache(batch, prompt, needed)
        if key not in self._buckets:
            cache = make_cache()
            options = {"freezing": True, "cpp_wrapper": True,
                       # the step's inputs keep their shapes and its cache its storage: no guard can fail
                       "guard_filter_fn": torch.compiler.skip_all_guards_unsafe}

            def step(token: torch.Tensor, position: torch.Tensor, banned: torch.Tensor, cache: Any = cache) -> torch.Tensor:
                return self._step(token, position, banned, cache)

            compiled = torch.compile(_own_code(step), fullgraph=True, dynamic=False, options=options) if self._compile else step
            self._buckets[key] = (cache, compiled)
        self.cache, step_fn = self._buckets[key]
        return step_fn

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None,
                 min_new_tokens: int = 0) -> torch.Tensor:
        """Prompt + up to `max_new_tokens` greedy tokens, [B, S + new]; stops early when every row hit EOS.
        As in HF, EOS cannot be chosen before `min_new_tokens` tokens."""
        batch, prompt = input_ids.shape
        if self.kv_settings is None and prompt + max_new_tokens > self.max_cache_len:
            raise ValueError(f"prompt {prompt} + {max_new_tokens} new tokens exceeds the static cache ({self.max_cache_len})")
        step = self._select(batch, prompt, prompt + max_new_tokens)
        self.cache.reset()
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []), dtype=torch.long)
        vocab = self.model.config.vocab_size
        no_ban = torch.zeros(vocab, dtype=torch.bool)
        eos_ban = no_ban.clone().index_fill_(0, eos, True) if eos.numel() else no_ban
        started = time.perf_counter()
        logits = self.model(input_ids=input_ids, **with_cache(self.model, self.cache), cache_position=torch.arange(prompt),
                            use_cache=True, **last_logits_only(self.model)).logits[:, -1]
        prefilled = time.perf_counter()
        token = logits.masked_fill(eos_ban if min_new_tokens > 0 else no_ban, float("-inf")).argmax(-1, keepdim=True)
        tokens = [token]
        finished = torch.isin(token, eos) if eos.numel() else torch.zeros_like(token, dtype=torch.bool)
        for i in range(1, max_new_tokens):
            if eos.numel() and bool(finished.all()):
                break
            token = step(token, torch.tensor([prompt + i - 1]), eos_ban if i < min_new_tokens else no_ban)
            if eos.numel():
                token = torch.where(finished, tokens[-1], token)
                finished |= torch.isin(token, eos)
            tokens.append(token)
        # where the time went, for benchmarks that report decode speed apart from prefill
        self.last_timing = {"prefill_s": prefilled - started, "decode_s": time.perf_counter() - prefilled,
                            "decode_steps": len(tokens) - 1}
        return torch.cat([input_ids, *tokens], dim=1)


def _is_plain_greedy(args: tuple, kwargs: dict[str, Any]) -> bool:
    allowed = {"input_ids", "max_new_tokens", "min_new_tokens", "do_sample", "attention_mask", "pad_token_id",
               "eos_token_id"}
    if args or set(kwargs) - allowed or kwargs.get("do_sample"):
        return False
    mask = kwargs.get("attention_mask")
    return mask is None or bool(mask.all())


def takes_static_path(decoder: StaticDecoder, args: tuple, kwargs: dict[str, Any]) -> bool:
    """Whether a `generate(*args, **kwargs)` call can run on `decoder` (plain greedy, fits its cache)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    rest = {k: v for k, v in kwargs.items() if k != "input_ids"}
    new = kwargs.get("max_new_tokens")
    if ids is None or new is None or not _is_plain_greedy(args[1:], rest):
        return False
    return decoder.kv_settings is not None or ids.shape[1] + new <= decoder.max_cache_len


def _fast_generate(self: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """`generate()` for models with an `optpass_decoder`: plain greedy calls take the static path."""
    decoder: StaticDecoder = self.optpass_decoder
    if not takes_static_path(decoder, args, kwargs):
        return type(self).generate(self, *args, **kwargs)
    ids = kwargs.get("input_ids", args[0] if args else None)
    new = kwargs["max_new_tokens"]
    eos = kwargs.get("eos_token_id", self.generation_config.eos_token_id)
    return decoder.generate(ids, new, eos, kwargs.get("min_new_tokens") or 0)


def install_fast_generate(model: nn.Module, max_cache_len: int = 1024) -> nn.Module:
    """Make `model.generate(input_ids, max_new_tokens=..., do_sample=False)` use a `StaticDecoder`.

    Anything else (sampling, beams, padding, streamers, processors) goes to the class's `generate`.
    The hook lives on the instance (`model.generate`, `model.optpass_decoder`), so `deepcopy` carries it.
    """
    model.optpass_decoder = StaticDecoder(model, max_cache_len=max_cache_len)
    model.generate = types.MethodType(_fast_generate, model)
    return model
