"""Quantized tiny Llamas for the export tests: built by `optimize()` (with its records) or by swapping the
quantized modules in directly (any layout, in a fraction of a second)."""

from __future__ import annotations

import torch
from torch import nn

from optpass.backends.cpu.quant_linear import Int4Linear, Int8Linear

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")

# run by stock transformers in a subprocess: argv = model dir, token windows (.pt), output logits (.pt)
TRANSFORMERS_LOGITS = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    out = torch.stack([model(input_ids=w[None]).logits[0] for w in torch.load(sys.argv[2])])
assert "optpass" not in sys.modules
torch.save(out, sys.argv[3])
"""


def sharp_tiny_llama(sharpen: float = 6.0, vocab: int = 256) -> nn.Module:
    """tiny_llama with q / k weights scaled up, so attention depends on positions and a wrong rotary row order
    changes the logits visibly (random tiny weights attend almost uniformly)."""
    from optpass.models import tiny_llama

    model = tiny_llama(vocab=vocab)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
    return model


def quantize_as(model: nn.Module, layout: dict[str, tuple[str, int]]) -> nn.Module:
    """Replace each nn.Linear whose path ends with a key of `layout` by (scheme, group size; 0 = per channel)."""
    for path, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        spec = next((v for k, v in layout.items() if path.endswith(k)), None)
        if spec is None:
            continue
        scheme, group = spec
        new = (Int4Linear.from_linear(module, group) if scheme == "int4"
               else Int8Linear.from_linear(module, group_size=group or None))
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr, new)
        if attr == "lm_head":
            model.config.tie_word_embeddings = False  # as the quantize pass does for a quantized tied head
    return model


def dequantized(module: nn.Module) -> torch.Tensor:
    return module.dequantized_weight() if hasattr(module, "dequantized_weight") else module.weight.detach().float()
