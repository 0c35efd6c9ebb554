"""The Llama architecture, one decoder block at a time: the model skeleton on the meta device, a block
materialized from the shards, its forward with the model's own rotary embeddings and causal mask, and the
AWQ fold groups of a block (the ones `passes/awq.fold_groups` finds in a captured Llama graph).

Only Llama is accepted: the block call, the key names and the fold groups are this architecture's. Others
are refused by name rather than quantized with a guess.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import nn

from optpass.errors import UnsupportedModelError
from optpass.streaming.shards import ShardReader

SUPPORTED = {"llama": "LlamaForCausalLM"}

# Per block: linears sharing an input, in graph order, and the producer that absorbs 1/s (AWQ). o_proj's
# input comes from attention: nothing to fold into, it is quantized unscaled (as in the whole-model pass).
BLOCK_GROUPS: tuple[dict[str, Any], ...] = (
    {"linears": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "fold": ("norm", "input_layernorm")},
    {"linears": ["mlp.gate_proj", "mlp.up_proj"], "fold": ("norm", "post_attention_layernorm")},
    {"linears": ["mlp.down_proj"], "fold": ("rows", "mlp.up_proj")},
)
UNSCALED = ("self_attn.o_proj",)
HEAD_GROUP = {"linears": ["lm_head"], "fold": ("norm", "norm")}  # on a (norm, lm_head) container


def check_architecture(config: Any, where: str) -> None:
    """Refuse anything but a Llama causal LM, naming what it is."""
    model_type = getattr(config, "model_type", None)
    archs = list(getattr(config, "architectures", None) or [])
    if model_type not in SUPPORTED:
        named = ", ".join(archs) or "no architectures field"
        raise UnsupportedModelError(
            f"{where}: block-by-block quantization supports the Llama architecture ({SUPPORTED['llama']}); this "
            f"checkpoint is model_type {model_type!r} ({named}). Load it whole (streaming=False) if it fits in memory")
    wrong = [a for a in archs if a != SUPPORTED[model_type]]
    if wrong:
        raise UnsupportedModelError(f"{where}: architecture {wrong[0]} is not a causal LM this path quantizes; "
                                    f"supported: {SUPPORTED[model_type]}")


def skeleton(config: Any) -> nn.Module:
    """The whole model on the meta device: names, shapes and module types, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.to(torch.float32).eval()  # whatever the shards store: computed in fp32


class BlockRunner:
    """Materializes decoder blocks and runs hidden states [B, S, H] through them as `LlamaModel.forward` does."""

    def __init__(self, model: nn.Module, reader: ShardReader) -> None:
        self.meta = model
        self.config = model.config
        self.reader = reader
        # the model's own rotary module, built for real (its inv_freq is a non-persistent buffer, not a weight)
        self.rotary = type(model.model.rotary_emb)(config=self.config).eval()
        self._context: dict[tuple[int, int], dict[str, Any]] = {}

    @property
    def layers(self) -> int:
        return len(self.meta.model.layers)

    def materialize(self, prefix: str, template: nn.Module) -> nn.Module:
        """A real copy of the meta `template` whose tensors are read from the shards under `prefix`."""
        module = copy.deepcopy(template)
        names = list(template.state_dict())
        state = {n: self.reader.read(prefix + n) for n in names}
        module.load_state_dict(state, strict=True, assign=True)
        return module.requires_grad_(False).eval()

    def block(self, index: int) -> nn.Module:
        return self.materialize(f"model.layers.{index}.", self.meta.model.layers[index])

    def _kwargs(self, hidden: torch.Tensor) -> dict[str, Any]:
        """Position ids, rotary (cos, sin) and causal mask for a [B, S] batch, computed once per shape."""
        key = (hidden.shape[0], hidden.shape[1])
        if key not in self._context:
            pos = torch.arange(hidden.shape[1]).unsqueeze(0)
            self._context[key] = {"position_ids": pos, "position_embeddings": self.rotary(hidden, position_ids=pos),
                                  "attention_mask": _causal_mask(self.config, hidden, pos)}
        return self._context[key]

    @torch.no_grad()
    def forward(self, block: nn.Module, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each batch's hidden states through `block`."""
        out = []
        for h in hidden:
            y = block(h, **self._kwargs(h))
            out.append(y[0] if isinstance(y, tuple) else y)
        return out


def _causal_mask(config: Any, hidden: torch.Tensor, pos: torch.Tensor) -> Any:
    """The model's causal mask for unpadded inputs (None where SDPA takes `is_causal`), across mask-API versions."""
    from transformers.masking_utils import create_causal_mask

    params = inspect.signature(create_causal_mask).parameters
    kwargs: dict[str, Any] = {"config": config, "attention_mask": None, "position_ids": pos}
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = hidden
    for name in ("cache", "past_key_values"):
        if name in params:
            kwargs[name] = None
    if "cache_position" in params:
        kwargs["cache_position"] = pos[0]
    return create_causal_mask(**kwargs)
