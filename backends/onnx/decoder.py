"""The exportable decode step of a Llama-family causal LM, with the KV cache as explicit tensors.

forward(input_ids [B, S], past_key_0 [B, Hkv, P, D], past_value_0, ...) -> (logits [B, S, V],
present_key_0 [B, Hkv, P + S, D], present_value_0, ...). The new tokens sit at positions P .. P + S - 1, so
the same graph runs the prefill (P = 0) and every decode step (S = 1) of a greedy loop in ONNX Runtime.
It reads the HF model's modules (norms, projections, rotary inverse frequencies) without modifying them;
optpass's quantized linears are swapped for their MatMulNBits export form (`matmul_nbits.export_linear`).
Attention is the plain softmax(q k^T / sqrt(D) + causal mask) v with GQA by expand (as HF's eager path).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from optpass.backends.onnx.matmul_nbits import export_linear
from optpass.errors import UnsupportedModelError

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DecoderSpec:
    """What a runner needs to know to drive the exported graph (also written next to the .onnx)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eos_token_id: int | list[int] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def input_names(self) -> list[str]:
        return ["input_ids"] + [f"past_{kind}_{i}" for i in range(self.num_layers) for kind in ("key", "value")]

    def output_names(self) -> list[str]:
        return ["logits"] + [f"present_{kind}_{i}" for i in range(self.num_layers) for kind in ("key", "value")]


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Layer(nn.Module):
    def __init__(self, layer: nn.Module, accuracy_level: int | None) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self.proj = nn.ModuleDict({n: export_linear(getattr(layer.self_attn, n), accuracy_level) for n in _PROJECTIONS})
        self.mlp = nn.ModuleDict({n: export_linear(getattr(layer.mlp, n), accuracy_level) for n in _MLP})


class KVDecoder(nn.Module):
    """Functional Llama forward over explicit past / present KV tensors (see the module docstring)."""

    def __init__(self, model: nn.Module, accuracy_level: int | None = None) -> None:
        super().__init__()
        self.spec = decoder_spec(model)
        inner = model.model
        self.embed = inner.embed_tokens
        self.layers = nn.ModuleList(_Layer(layer, accuracy_level) for layer in inner.layers)
        self.norm = inner.norm
        self.lm_head = export_linear(model.lm_head, accuracy_level)
        rotary = inner.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        self.act = model.model.layers[0].mlp.act_fn

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        spec = self.spec
        s = input_ids.shape[1]
        p = past[0].shape[2]
        pos = torch.arange(s, device=input_ids.device, dtype=torch.float32) + p
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.rope_scale, emb.sin() * self.rope_scale
        key_pos = torch.arange(p + s, device=input_ids.device, dtype=torch.float32)
        mask = torch.where(key_pos[None, :] > pos[:, None], float("-inf"), 0.0)
        groups = spec.num_heads // spec.num_kv_heads
        h = self.embed(input_ids)
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            # shapes through unflatten / flatten / -1, so the exporter does little symbolic-size arithmetic
            x = _rms_norm(layer.input_layernorm, h)
            q = layer.proj["q_proj"](x).unflatten(-1, (spec.num_heads, spec.head_dim)).transpose(1, 2)
            k = layer.proj["k_proj"](x).unflatten(-1, (spec.num_kv_heads, spec.head_dim)).transpose(1, 2)
            v = layer.proj["v_proj"](x).unflatten(-1, (spec.num_kv_heads, spec.head_dim)).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k = torch.cat((past[2 * i], k), dim=2)
            v = torch.cat((past[2 * i + 1], v), dim=2)
            presents += [k, v]
            k_all = k.unsqueeze(2).expand(-1, -1, groups, -1, -1).flatten(1, 2)
            v_all = v.unsqueeze(2).expand(-1, -1, groups, -1, -1).flatten(1, 2)
            scores = (q @ k_all.transpose(-1, -2)) * (spec.head_dim ** -0.5) + mask
            attn = F.softmax(scores, dim=-1) @ v_all
            h = h + layer.proj["o_proj"](attn.transpose(1, 2).flatten(2))
            x = _rms_norm(layer.post_attention_layernorm, h)
            h = h + layer.mlp["down_proj"](self.act(layer.mlp["gate_proj"](x)) * layer.mlp["up_proj"](x))
        logits = self.lm_head(_rms_norm(self.norm, h))
        return (logits, *presents)

    def empty_past(self, batch: int = 1, length: int = 0) -> list[torch.Tensor]:
        spec = self.spec
        return [torch.zeros(batch, spec.num_kv_heads, length, spec.head_dim) for _ in range(2 * spec.num_layers)]


EXPORTABLE = ("llama",)  # model types whose math KVDecoder writes out (tested against the PyTorch model)


def _unsupported_parts(model: nn.Module) -> list[str]:
    """What of `model` KVDecoder's Llama math would compute wrongly, named (empty: exportable)."""
    from optpass.hf_compat import FULL, layer_kinds

    config = model.config
    parts = []
    if any(k.kind != FULL for k in layer_kinds(config)):
        parts.append("sliding-window attention layers")
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if names & {"q_norm", "k_norm"}:
        parts.append("q/k norms")
    if getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu") != "silu":
        parts.append(f"activation {getattr(config, 'hidden_activation', None) or config.hidden_act}")
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
        parts.append("logit softcapping")
    if getattr(config, "attention_bias", False):
        parts.append("attention biases")
    if config.model_type not in EXPORTABLE:
        parts.append(f"model type {config.model_type!r} (exportable: {', '.join(EXPORTABLE)})")
    return parts


def decoder_spec(model: nn.Module) -> DecoderSpec:
    """Read the decoder's shape from a HF Llama-family config; other architectures get a clear error naming
    the parts the exporter does not write out."""
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if config is None or inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        raise UnsupportedModelError(
            f"ONNX export: {type(model).__name__} is not a Llama-family causal LM (needs .model.layers, "
            ".model.rotary_emb and a config); export other models with torch.onnx.export directly")
    parts = _unsupported_parts(model)
    if parts:
        raise UnsupportedModelError(f"ONNX export: {type(model).__name__} has {'; '.join(parts)}, which the Llama "
                                    "decode graph does not implement; export it with torch.onnx.export directly")
    layer = inner.layers[0]
    missing = [n for n in _PROJECTIONS if not hasattr(layer.self_attn, n)] + [n for n in _MLP if not hasattr(layer.mlp, n)]
    if missing:
        raise UnsupportedModelError(f"ONNX export: decoder layer {type(layer).__name__} lacks {missing}")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return DecoderSpec(config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", heads), head_dim,
                       config.vocab_size, getattr(config, "eos_token_id", None))
