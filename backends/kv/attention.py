"""Routes attention through a `CompressedKVCache` when one is passed as `past_key_values`.

The attention module's class is swapped for a subclass (state dict, deepcopy and `save_pretrained` are
unchanged) whose `forward` computes q/k/v and RoPE exactly as the model does, then lets the cache layer
attend: exact attention at prefill, compressed at decode. With any other cache it is the original forward.
Supported: Llama-style attention (q/k/v/o projections, `apply_rotary_pos_emb` in the model's module:
Llama, Mistral, Qwen2, SmolLM2, ...).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from optpass.errors import UnsupportedModelError

_SUBCLASSES: dict[type, type] = {}


def _padding_valid(mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
    """[B, S] key validity from HF's 4D prefill mask (the last query row sees every non-padding key)."""
    if mask is None or mask.dim() != 4:
        return None
    last = mask[:, 0, -1, -seq:]
    return last if last.dtype == torch.bool else last == 0


def _compressed_forward(self: nn.Module, hidden_states: torch.Tensor, position_embeddings: Any = None,
                        attention_mask: torch.Tensor | None = None, past_key_values: Any = None, **kwargs: Any):
    from optpass.backends.kv.cache import CompressedKVCache

    if not isinstance(past_key_values, CompressedKVCache):
        return super(type(self), self).forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
    b, s, _ = hidden_states.shape
    shape = (b, s, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = self._optpass_rope(q, k, cos, sin)
    layer = past_key_values.layer(self.layer_idx, s)
    out = layer.attend(q, k, v, _padding_valid(attention_mask, b, s) if s > 1 else None, self.scaling)
    return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), None


def rope_for(cls: type) -> Any:
    """The model's own `apply_rotary_pos_emb`, from the module that defines its attention class or the class it
    derives from (so a swapped class finds its model's), or None."""
    for klass in cls.__mro__:
        fn = getattr(sys.modules[klass.__module__], "apply_rotary_pos_emb", None)
        if fn is not None:
            return fn
    return None


def _subclass(cls: type) -> type:
    if cls not in _SUBCLASSES:
        rope = rope_for(cls)
        _SUBCLASSES[cls] = type(f"Compressed{cls.__name__}", (cls,), {
            "forward": _compressed_forward, "_optpass_rope": staticmethod(rope), "__module__": __name__})
    return _SUBCLASSES[cls]


def is_supported(module: nn.Module) -> str | None:
    """None if `module` is an attention the hook can drive, else the reason it cannot."""
    missing = [a for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx") if not hasattr(module, a)]
    if missing:
        return f"{type(module).__name__} lacks {', '.join(missing)} (not Llama-style attention)"
    if rope_for(type(module)) is None:
        return f"{type(module).__module__} has no apply_rotary_pos_emb"
    return None


def attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for name, m in model.named_modules() if name.endswith("self_attn")]


def enable_compressed_attention(model: nn.Module) -> list[str]:
    """Swap every Llama-style attention module's class; returns their paths."""
    paths = []
    for name, module in model.named_modules():
        if not name.endswith("self_attn") or type(module) in _SUBCLASSES.values():
            continue
        reason = is_supported(module)
        if reason:
            raise UnsupportedModelError(f"KV-cache compression: {name}: {reason}")
        module.__class__ = _subclass(type(module))
        paths.append(name)
    return paths
