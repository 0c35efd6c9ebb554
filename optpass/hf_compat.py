"""What optpass reads from transformers, in one place, so that a renamed argument is followed once.

transformers 5.2x renamed the cache argument of every model `forward` (and of `generate`) from
`past_key_values` to `cache`, keeping the old name as a deprecated alias until 5.40. optpass asks each model
which name its `forward` takes instead of hard-coding either. Layer kinds come from the documented config
fields (`layer_types`, `sliding_window`), the same ones transformers' own caches are built from.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import nn

FULL, SLIDING = "full_attention", "sliding_attention"


def cache_kwarg(model: nn.Module) -> str:
    """The keyword `model.forward` (and its `generate`) takes the KV cache under."""
    forward = getattr(model, "forward", None)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _forward_params(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def last_logits_only(model: nn.Module) -> dict[str, Any]:
    """`{"logits_to_keep": 1}` where the model takes it: a prefill for generation needs the head only at the last
    position (for a 262k vocabulary at 512 tokens, the head is most of the prefill's FLOPs)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in _forward_params(model) else {}


def with_cache(model: nn.Module, cache: Any) -> dict[str, Any]:
    """`{name: cache}` to splat into a forward / generate call of `model`."""
    return {cache_kwarg(model): cache}


def output_cache(model: nn.Module, output: Any) -> Any:
    """The cache a forward or `generate(return_dict_in_generate=True)` returned, under either name."""
    for name in (cache_kwarg(model), "cache", "past_key_values"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


@dataclass(frozen=True)
class LayerKind:
    """How one decoder layer attends: over everything (`full_attention`) or a trailing window (plus, for a
    layer the `linear_attention` pass made local, its first `sink` tokens)."""

    kind: str
    window: int | None = None
    sink: int = 0
    linear: bool = False  # a local layer that also attends linearly to what left its window (method="hedgehog")


# config attribute: {"layer index": [sink, window]} of full-attention layers made local (sliding window + sinks);
# a plain dict so it survives config.json
LOCAL_LAYERS = "optpass_local_layers"


# config attribute: ["layer index", ...] of local layers that are sliding-window + linear-attention hybrids
LINEAR_LAYERS = "optpass_linear_layers"


def linear_layers(config: Any) -> set[int]:
    """Indices of the local layers that also attend linearly beyond their window (Hedgehog hybrids)."""
    return {int(i) for i in getattr(text_config(config), LINEAR_LAYERS, None) or ()}


def local_layers(config: Any) -> dict[int, tuple[int, int]]:
    """layer index -> (sink, window) of the layers optpass made local."""
    found = getattr(text_config(config), LOCAL_LAYERS, None) or {}
    return {int(i): (int(v[0]), int(v[1])) for i, v in found.items()}


def text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if callable(getter) else config


def layer_kinds(config: Any) -> list[LayerKind]:
    """Per decoder layer, its attention kind, from `config.layer_types` (or `sliding_window` when a model
    declares no types, as Mistral does). Kinds optpass does not know are returned as they are, so callers
    can refuse them by name."""
    cfg = text_config(config)
    n = int(cfg.num_hidden_layers)
    window = getattr(cfg, "sliding_window", None)
    types = list(getattr(cfg, "layer_types", None) or [SLIDING if window else FULL] * n)
    kinds = [LayerKind(t, int(window) if t == SLIDING and window else None) for t in types[:n]]
    hybrid = linear_layers(config)
    for i, (sink, local_window) in local_layers(config).items():
        kinds[i] = LayerKind(SLIDING, local_window, sink, i in hybrid)
    return kinds


def full_attention_layers(config: Any) -> list[int]:
    """Indices of the layers with full (not sliding-window) attention."""
    return [i for i, k in enumerate(layer_kinds(config)) if k.kind == FULL]


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """layer index -> attention module (transformers' attention modules carry `layer_idx`)."""
    return {m.layer_idx: m for m in model.modules()
            if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "config") and any(
                hasattr(m, p) for p in ("q_proj", "qkv_proj", "query_key_value", "c_attn"))}
