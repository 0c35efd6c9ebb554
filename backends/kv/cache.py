"""`CompressedKVCache`: a transformers `Cache` whose full-attention layers keep a fixed budget of tokens
(policy-scored slots, packed int8 / int4, plus a full-precision recent window) and whose sliding-window layers
keep exactly the model's window (packed the same way). Pass it as the cache of `generate()` or a forward
(`optpass.hf_compat.with_cache`); a model needs `enable_compressed_attention` first (the `kv_cache` pass
does both). `ring_cache()` is the uncompressed, compile-safe cache of the static decoder for models with
sliding-window layers."""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, StaticLayer

from optpass.backends.kv.layer import CompressedLayer, OptpassLayer
from optpass.backends.kv.ring import RingLayer
from optpass.errors import ConfigError, UnsupportedModelError
from optpass.backends.kv.policies import get_policy
from optpass.hf_compat import FULL, SLIDING, LayerKind, layer_kinds



@dataclass(frozen=True)
class KVSettings:
    """What a compressed cache keeps. `keep` is a ratio of the prompt in (0, 1] or a token count (int > sink),
    counting slots and window together. `layer_weights` scale each layer's budget (mean 1): pyramid or
    measured-density schedules (see `backends/kv/policies/budgets.py`)."""

    policy: str = "snapkv"
    keep: float | int = 0.25
    window: int = 32
    sink: int = 4
    bits: int | None = 8
    merge_threshold: float | None = None
    layer_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        get_policy(self.policy)  # unknown policy -> ConfigError
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)):
            raise ConfigError(f"KV keep={self.keep!r}: give a ratio in (0, 1] or a token count")
        if isinstance(self.keep, float) and not 0.0 < self.keep <= 1.0:
            raise ConfigError(f"KV keep ratio {self.keep} is outside (0, 1]")
        if isinstance(self.keep, int) and self.keep <= self.sink:
            raise ConfigError(f"KV token budget {self.keep} is not above the sink size ({self.sink}): nothing but sinks would be kept")
        if self.bits not in (None, 8, 4):
            raise ConfigError(f"KV bits={self.bits}; allowed: None (float), 8, 4")
        if self.window < 1 or self.sink < 0:
            raise ConfigError(f"KV window={self.window} must be >= 1 and sink={self.sink} >= 0")
        if self.merge_threshold is not None and not -1.0 <= self.merge_threshold < 1.0:
            raise ConfigError(f"KV merge_threshold={self.merge_threshold} must be a cosine similarity in [-1, 1)")

    def budget_tokens(self, context: int) -> int:
        if isinstance(self.keep, float):
            return max(math.ceil(self.keep * context), self.sink + 2)
        return self.keep

    def shapes(self, num_layers: int, context: int) -> tuple[int, list[int]]:
        """(window, per-layer slot capacities) for a prompt of `context` tokens."""
        budget = self.budget_tokens(context)
        window = min(self.window, budget - self.sink - 1)
        base = budget - window
        weights = self.layer_weights or (1.0,) * num_layers
        if len(weights) != num_layers:
            raise ConfigError(f"KV layer_weights has {len(weights)} entries for {num_layers} layers")
        return window, [max(int(round(base * w)), self.sink + 1) for w in weights]


def _kinds(model_config: Any) -> list[LayerKind]:
    """Layer kinds of a model config, or `n` full-attention layers when given an int (tests, benchmarks)."""
    if isinstance(model_config, int):
        return [LayerKind(FULL)] * model_config
    kinds = layer_kinds(model_config)
    unknown = sorted({k.kind for k in kinds} - {FULL, SLIDING})
    if unknown:
        raise UnsupportedModelError(f"optpass KV cache: layer kinds {unknown} are not supported")
    return kinds


class CompressedKVCache(Cache):
    """Layers are created at the first forward (when the prompt length fixes ratio budgets), or up front with
    `context` for a static-shape decode step. `model_config` is the model's config (its layer kinds decide
    which layers are compressed and which keep their sliding window) or a layer count (all full attention)."""

    def __init__(self, settings: KVSettings, model_config: Any, context: int | None = None, record: bool = False) -> None:
        super().__init__(layers=[])
        from optpass.backends.kv.attention import _claims

        _claims.clear()
        self.settings = settings
        self.kinds = _kinds(model_config)
        self.num_layers = len(self.kinds)
        self.record = record
        if context is not None:
            self.build(context)

    @classmethod
    def recording(cls, model_config: Any) -> CompressedKVCache:
        """An exact cache (keeps everything) that also keeps each layer's prompt q/k/v for `replay`."""
        return cls(KVSettings(keep=1.0, bits=None), model_config, record=True)

    def replay(self, settings: KVSettings) -> CompressedKVCache:
        """A cache with `settings` holding this recorded prompt, as if the prompt had been run through it (prefill
        attention is exact, so only the cache contents differ): benchmarks compare budgets at one prefill's cost."""
        prompts = [layer.prompt for layer in self.layers]
        if not prompts or any(p is None for p in prompts):
            raise ValueError("replay needs a prefilled CompressedKVCache.recording() cache")
        other = CompressedKVCache(settings, 0, context=None)
        other.kinds, other.num_layers = self.kinds, self.num_layers
        other.build(prompts[0][1].shape[2])
        for layer, prompt in zip(other.layers, prompts):
            layer.load_prompt(*prompt)
        return other

    def build(self, context: int) -> None:
        """Create the layers for a prompt of `context` tokens: ratio budgets of the full layers follow it."""
        full = [i for i, k in enumerate(self.kinds) if k.kind == FULL]
        s = self.settings
        window, capacities = s.shapes(len(full), context) if full else (0, [])
        budget = dict(zip(full, capacities))
        self.layers = [CompressedLayer(budget[i], window, s.sink, s.bits, get_policy(s.policy), s.merge_threshold, i)
                       if k.kind == FULL else local_layer(k, s.bits, i)
                       for i, k in enumerate(self.kinds)]
        for layer in self.layers:
            layer.record = self.record

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.layers:
            self.build(key_states.shape[2])
        return self.layers[layer_idx].update(key_states, value_states)

    def layer(self, idx: int, prompt_len: int) -> OptpassLayer:
        if not self.layers:
            self.build(prompt_len)
        return self.layers[idx]

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    def nbytes(self) -> int:
        """Bytes allocated by every layer's cache tensors."""
        return sum(layer.nbytes() for layer in self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].seen if layer_idx < len(self.layers) else 0


def static_cache(model_config: Any, max_cache_len: int, slack: int = 0) -> Cache:
    """An uncompressed cache with static shapes for a compiled decode step: a `PromptFirstLayer` (transformers'
    `StaticLayer` whose prompt attends only to itself) for full layers and an exact ring of the model's window
    for sliding ones (transformers' static sliding layer branches on a Python counter, which a compiled step
    that skips guards would freeze). The ring needs `enable_compressed_attention(model)`; `slack` extra ring
    slots let a speculative step roll back that many tokens."""
    return Cache(layers=[PromptFirstLayer(max_cache_len) if k.kind == FULL else local_layer(k, None, i, slack)
                         for i, k in enumerate(_kinds(model_config))])


def local_layer(kind: LayerKind, bits: int | None, layer_idx: int, slack: int = 0) -> RingLayer:
    """The cache of a sliding-window layer: an exact ring of its window (and sinks), or, for a layer converted to
    the sliding-window + linear-attention hybrid, the ring plus the constant-size linear state."""
    if kind.linear:
        from optpass.backends.linear.hybrid import HybridLayer

        return HybridLayer(int(kind.window), bits, layer_idx, slack, kind.sink)
    return RingLayer(int(kind.window), bits, layer_idx, slack, kind.sink)


class PromptFirstLayer(StaticLayer):
    """transformers' `StaticLayer`, except that the prompt (the first update after a reset) attends to its own
    keys only, not to all `max_cache_len` slots: a static layer hands attention the whole buffer with a mask
    over it, so a 1.1k-token prompt in a 2048-slot cache paid for 2048 keys per query, and an explicit mask
    also kept SDPA off its causal kernel. Decode steps see the whole static buffer as before."""

    def __init__(self, max_cache_len: int) -> None:
        super().__init__(max_cache_len)
        self.prefilled = False  # a Python flag: compiled decode steps see it constant (True)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.prefilled:
            return keys, values
        self.prefilled = True
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (super().get_mask_sizes(query_length) if self.prefilled else (query_length, 0))

    def reset(self) -> None:
        super().reset()
        self.prefilled = False


def has_sliding_layers(model_config: Any) -> bool:
    return any(k.kind == SLIDING for k in _kinds(model_config))


def cache_nbytes(cache: Cache) -> int:
    """Bytes a cache's layers allocated: optpass layers count every tensor they hold (packed slots, scales,
    scores); transformers' layers their keys and values."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, OptpassLayer):
            total += layer.nbytes()
        else:
            total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
    return total


def rollback(cache: Cache, tokens: int, skipped: Collection[int] = ()) -> None:
    """Forget the last `tokens` tokens of every layer but `skipped` (a rejected draft; a self-drafting step wrote
    nothing in the blocks it skipped), through transformers' `crop` convention for static layers (`crop(-n)`);
    the stale entries are overwritten by the next step and masked until then."""
    if tokens:
        for i, layer in enumerate(cache.layers):
            if i not in skipped:
                layer.crop(-tokens)


def snapshot(cache: CompressedKVCache) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """A copy of a compressed cache's state before a verify step. Its layers evict as tokens arrive, so a rejected
    draft cannot be cropped away: the engine restores this and re-runs the accepted tokens instead."""
    return [(layer.seen, {n: t.clone() for n, t in layer.tensors().items()}) for layer in cache.layers]


def restore(cache: CompressedKVCache, saved: list[tuple[int, dict[str, torch.Tensor]]]) -> None:
    """Put `snapshot`'s state back, in place (compiled steps hold the cache's tensors)."""
    for layer, (seen, tensors) in zip(cache.layers, saved):
        layer.seen = seen
        current = layer.tensors()
        for name, value in tensors.items():
            current[name].copy_(value)


def can_roll_back(cache: Cache) -> bool:
    return all(getattr(layer, "is_croppable", False) for layer in cache.layers)
