"""optpass's attention function, registered with transformers' `AttentionInterface`.

The model keeps computing its own projections, norms and RoPE; only the attention call goes through here.
`optpass|<inner>` wraps the implementation the model used before (`sdpa`, `eager`, ...): layers whose cache is
not optpass's get exactly that implementation, except long prefills of layers the sparse_attention pass
planned (`backends/sparse/attend.py`), long prefills of layers marked for the bf16 prefill kernel
(`backends/cpu/prefill_attention.py`), layers made local, whose mask is narrowed to sinks + window
(`backends/kv/band.py`), and layers converted to the sliding-window + linear-attention hybrid, which attend
through `backends/linear/hybrid.py` (their cache layer, `HybridLayer`, gets the layer's feature maps). A cache layer of optpass's (`CompressedLayer`) *claims* the
attention call that follows its `update()` (every transformers attention calls `cache.update` and then the
attention function, for the same layer): at prefill the inner implementation attends exactly and the layer
then scores and compresses the prompt; at decode the layer attends over its own slots (per-head validity,
optional logit softcap) and accumulates scores.

What it supports, checked before anything is installed (`support_reason`): models that declare
`_supports_attention_backend`, full and sliding-window layers, logit softcapping. It refuses attention sinks
(`sinks` parameters), layer kinds it does not know (chunked, linear, shared KV) and encoder-decoders.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from optpass.backends.cpu import decode_attention, prefill_attention
from optpass.backends.kv.band import banded, local_window
from optpass.backends.linear import hybrid
from optpass.backends.linear.feature_map import maps_of
from optpass.backends.sparse.attend import sparse_prefill
from optpass.errors import UnsupportedModelError
from optpass.hf_compat import FULL, SLIDING, layer_kinds

PREFIX = "optpass|"
SUPPORTED_KINDS = (FULL, SLIDING)
_claims: list[Any] = []  # the optpass cache layer whose update() just ran, waiting for its attention call
_observers: list[Callable] = []  # called as fn(module, query, key, mask, scaling) on every attention call
_value_observers: list[Callable] = []  # called as fn(module, query, key, value, mask, scaling)


@contextmanager
def observing(fn: Callable[[nn.Module, torch.Tensor, torch.Tensor, Any, float], None]) -> Iterator[None]:
    """Let `fn` see every attention call's query and key (after the model's RoPE and norms) while inside."""
    _observers.append(fn)
    try:
        yield
    finally:
        _observers.remove(fn)


@contextmanager
def observing_values(fn: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, Any, float], None]
                     ) -> Iterator[None]:
    """As `observing`, with the values too (attention transfer fits a layer to its exact outputs)."""
    _value_observers.append(fn)
    try:
        yield
    finally:
        _value_observers.remove(fn)


def claim(layer: Any) -> None:
    """Called by an optpass cache layer's `update()`: the next attention call for its layer is the layer's."""
    _claims[:] = [layer]


def _take_claim(module: nn.Module) -> Any:
    if not _claims:
        return None
    layer = _claims.pop()
    if layer.layer_idx != getattr(module, "layer_idx", layer.layer_idx):
        raise RuntimeError(f"optpass attention: cache layer {layer.layer_idx} was updated but layer "
                           f"{module.layer_idx} attended; this model's attention order is not supported")
    return layer


def _model_eager(module: nn.Module) -> Callable:
    """The model's own eager attention function (what transformers calls for `eager`)."""
    for klass in type(module).__mro__:
        fn = getattr(sys.modules.get(klass.__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn
    raise UnsupportedModelError(f"{type(module).__name__}: no eager_attention_forward to wrap")


def _inner(name: str, module: nn.Module) -> Callable:
    from transformers import AttentionInterface

    if name == "eager":
        return _model_eager(module)
    return AttentionInterface._global_mapping[name]


def _attention_for(inner: str) -> Callable:
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        layer = _take_claim(module)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if layer is not None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 \
                and attention_mask.shape[-1] > key.shape[2]:
            # a model with one mask for all layers (Llama) sizes it by its first full layer's static cache; an
            # optpass layer's prompt holds positions 0..S-1, the mask's first S columns (decode ignores the mask)
            attention_mask = attention_mask[..., :key.shape[2]]
        for observer in _observers:
            observer(module, query, key, attention_mask, scale)
        for observer in _value_observers:
            observer(module, query, key, value, attention_mask, scale)
        maps = maps_of(module)

        def dense() -> tuple[torch.Tensor, torch.Tensor | None]:
            mask, local = attention_mask, local_window(module)
            if maps is not None and local is not None:  # a sliding-window + linear-attention hybrid (hedgehog)
                return hybrid.parallel(query, key, value, mask, *local, maps, scale, kwargs.get("softcap")), None
            if local is not None:  # a layer made local: the model's mask narrowed to sinks + window
                mask = banded(attention_mask, query.shape[2], key.shape[2], *local, query.device)
            else:
                sparse = sparse_prefill(module, query, key, value, attention_mask, scale, kwargs)
                if sparse is not None:  # a long prefill of a layer the sparse_attention pass planned
                    return sparse, None
                fast = None if _decode_steps else \
                    prefill_attention.route(module, query, key, value, attention_mask, scale, kwargs)
                if fast is not None:  # a long prefill of a layer marked for the bf16 prefill kernel
                    return fast, None
            fn = _inner(inner, module)
            if _decode_steps:
                out = decode_attention.attend(query, key, value, mask, scale, kwargs.get("softcap"))
                if out is not None:
                    return out, None
                if query.shape[2] > 1 and isinstance(mask, torch.Tensor) and mask.dim() == 4:
                    return _per_query(fn, module, query, key, value, mask, scaling, dropout, kwargs)
            return fn(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)

        if layer is None:
            return dense()
        if kwargs.get("s_aux") is not None:
            raise UnsupportedModelError("optpass attention: attention sinks (s_aux) are not supported")
        if (maps is not None) != isinstance(layer, hybrid.HybridLayer):
            raise RuntimeError(f"optpass attention: layer {layer.layer_idx}'s cache was built for a different "
                               "conversion (hybrid linear attention or not) than its module has; build a new cache")
        extra = {"maps": maps} if maps is not None else {}
        return layer.attention(query, key, value, attention_mask, scale, kwargs.get("softcap"), dense, **extra)

    attention.__name__ = f"optpass_attention_{inner}"
    return attention


_decode_steps = False  # set while the decode runtime runs its steps (see `decode_steps`)


@contextmanager
def decode_steps() -> Iterator[None]:
    """The decode runtime's steps (one token, or a verify step's k + 1) attend through optpass's decode kernel
    (`backends/cpu/decode_attention.py`: each KV row read once for all grouped heads, hidden slots skipped), whose
    rows are computed identically whatever their number; where it does not apply, a verify step attends one
    query at a time. Either way each of a verify step's rows is bit-identical to a one-token step at that
    position, so greedy speculative decoding reproduces plain decoding exactly, not only up to near-ties.
    Read when a step is traced: the compiled steps keep the choice."""
    global _decode_steps
    previous, _decode_steps = _decode_steps, True
    try:
        yield
    finally:
        _decode_steps = previous


def _per_query(fn: Callable, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor, scaling: float | None, dropout: float, kwargs: dict[str, Any]
               ) -> tuple[torch.Tensor, None]:
    outs = []
    for i in range(query.shape[2]):
        out, _ = fn(module, query[:, :, i:i + 1], key, value, mask[:, :, i:i + 1], scaling=scaling, dropout=dropout,
                    **kwargs)
        outs.append(out)
    return torch.cat(outs, dim=1), None


def register(inner: str) -> str:
    """Register `optpass|<inner>` (attention + its mask function) and return the name."""
    from transformers import AttentionInterface, AttentionMaskInterface

    name = PREFIX + inner
    if name not in AttentionInterface._global_mapping:
        if inner != "eager" and inner not in AttentionInterface._global_mapping:
            raise UnsupportedModelError(f"optpass attention cannot wrap the unknown attention implementation {inner!r}")
        AttentionInterface.register(name, _attention_for(inner))
        masks = AttentionMaskInterface._global_mapping
        if inner in masks:
            AttentionMaskInterface.register(name, masks[inner])
    return name


def support_reason(model: nn.Module) -> str | None:
    """None if optpass's cache layers can drive this model's attention, else the reason they cannot."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        return f"{type(model).__name__} is not a transformers model (no config / set_attn_implementation)"
    if getattr(config, "is_encoder_decoder", False):
        return f"{type(model).__name__} is an encoder-decoder; optpass caches decoder-only self-attention"
    if not getattr(model, "_supports_attention_backend", False):
        return (f"{type(model).__name__} does not declare _supports_attention_backend, so its attention cannot be "
                "routed through transformers' AttentionInterface")
    unknown = sorted({k.kind for k in layer_kinds(config)} - set(SUPPORTED_KINDS))
    if unknown:
        return f"layer kinds {unknown} are not supported (supported: {', '.join(SUPPORTED_KINDS)})"
    if any(name.endswith("sinks") for name, _ in model.named_parameters()):
        return "attention sinks (learned `sinks` logits) are not supported"
    if getattr(config, "_attn_implementation", None) is None:
        return "the model has no attention implementation set"
    return None


def enable_compressed_attention(model: nn.Module) -> str:
    """Route `model`'s attention through optpass (a no-op for layers whose cache is not optpass's); returns
    the implementation name. Raises `UnsupportedModelError` with the reason when the model cannot be driven."""
    reason = support_reason(model)
    if reason:
        raise UnsupportedModelError(f"optpass KV cache: {reason}")
    current = model.config._attn_implementation
    if current.startswith(PREFIX):
        return current
    name = register(current)
    model.set_attn_implementation(name)
    return name


def disable_compressed_attention(model: nn.Module) -> None:
    """Put back the attention implementation `enable_compressed_attention` wrapped."""
    current = getattr(getattr(model, "config", None), "_attn_implementation", "") or ""
    if current.startswith(PREFIX):
        model.set_attn_implementation(current[len(PREFIX):])


def padding_valid(mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
    """[B, S] key validity from a 4D prefill mask: the last query row sees every key it may attend to
    (padding excluded; for a sliding-window layer, only the window)."""
    if mask is None or not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return None
    last = mask[:, 0, -1, -seq:]
    return last if last.dtype == torch.bool else last == 0
