"""`CompressedKVCache`: a Hugging Face `Cache` whose layers keep a fixed budget of tokens (policy-scored slots,
packed int8 / int4, plus a full-precision recent window). Pass it as `past_key_values` to `generate()` or a
forward; a model needs `enable_compressed_attention` first (the `kv_cache` pass does both)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from transformers.cache_utils import Cache

from optpass.backends.kv.layer import CompressedLayer
from optpass.errors import ConfigError
from optpass.backends.kv.policies import get_policy


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


class CompressedKVCache(Cache):
    """Layers are created at the first forward (when the prompt length fixes ratio budgets), or up front with
    `context` for a static-shape decode step."""

    def __init__(self, settings: KVSettings, num_layers: int, context: int | None = None, record: bool = False) -> None:
        super().__init__(layers=[])
        self.settings = settings
        self.num_layers = num_layers
        self.record = record
        if context is not None:
            self.build(context)

    @classmethod
    def recording(cls, num_layers: int) -> CompressedKVCache:
        """An exact cache (keeps everything) that also keeps each layer's prompt q/k/v for `replay`."""
        return cls(KVSettings(keep=1.0, bits=None), num_layers, record=True)

    def replay(self, settings: KVSettings) -> CompressedKVCache:
        """A cache with `settings` holding this recorded prompt, as if the prompt had been run through it (prefill
        attention is exact, so only the cache contents differ): benchmarks compare budgets at one prefill's cost."""
        prompts = [layer.prompt for layer in self.layers]
        if not prompts or any(p is None for p in prompts):
            raise ValueError("replay needs a prefilled CompressedKVCache.recording() cache")
        other = CompressedKVCache(settings, self.num_layers, context=prompts[0][1].shape[2])
        for layer, prompt in zip(other.layers, prompts):
            layer.load_prompt(*prompt)
        return other

    def build(self, context: int) -> None:
        window, capacities = self.settings.shapes(self.num_layers, context)
        s = self.settings
        self.layers = [CompressedLayer(c, window, s.sink, s.bits, get_policy(s.policy), s.merge_threshold)
                       for c in capacities]
        for layer in self.layers:
            layer.record = self.record

    def layer(self, idx: int, prompt_len: int) -> CompressedLayer:
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
