"""Tiny random-weight versions of the architectures users run, for the model matrix (`test_model_matrix.py`).

Each entry builds a model and the inputs its output is compared on. The LLM configs keep what makes each
architecture different: GQA (Llama, Qwen2/3), q/k norms (Qwen3, Gemma-3), sliding-window layers (Mistral,
Gemma-2/3), logit softcapping (Gemma-2), `Conv1D` layers (GPT-2); plus an encoder, a plain MLP and the
diffusers transformers of image models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

VOCAB = 128
LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=VOCAB, max_position_embeddings=2048)


def _causal(name: str, **overrides: Any) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(name, **{**LLM, **overrides})).eval()


def _ids(batch: int = 2, seq: int = 12) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(5))}


def llama() -> nn.Module:
    from optpass.models import tiny_llama

    return tiny_llama(vocab=VOCAB)


def qwen2() -> nn.Module:
    return _causal("qwen2")


def qwen3() -> nn.Module:
    return _causal("qwen3", head_dim=16)


def mistral() -> nn.Module:
    return _causal("mistral", sliding_window=8)


def gemma2() -> nn.Module:
    return _causal("gemma2", head_dim=16, sliding_window=8)


def gemma3() -> nn.Module:
    return _causal("gemma3_text", num_hidden_layers=3, num_key_value_heads=1, head_dim=32, sliding_window=8,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"])


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=2048,
                                      bos_token_id=0, eos_token_id=0)).eval()


def bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                vocab_size=VOCAB, max_position_embeddings=64), add_pooling_layer=False).eval()


def bert_inputs() -> dict[str, torch.Tensor]:
    ids = _ids(2, 12)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 32)).eval()


def dit() -> nn.Module:
    from optpass.models import tiny_dit

    return tiny_dit()


def flux() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                                  guidance_embeds=False, axes_dims_rope=(4, 6, 6)).eval()


def sd3() -> nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()


def _adapter_inputs(model: nn.Module) -> dict[str, Any]:
    from optpass.adapters import adapter_for

    return dict(adapter_for(model).example_batch(model).kwargs)


# name -> (builder, inputs(model) -> kwargs, extra optimize() kwargs)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], dict[str, Any]], dict[str, Any]]] = {
    "llama": (llama, lambda m: _ids(), {}),
    "qwen2": (qwen2, lambda m: _ids(), {}),
    "qwen3": (qwen3, lambda m: _ids(), {}),
    "mistral": (mistral, lambda m: _ids(), {}),
    "gemma2": (gemma2, lambda m: _ids(), {}),
    "gemma3": (gemma3, lambda m: _ids(), {}),
    "gpt2": (gpt2, lambda m: _ids(), {}),
    "bert": (bert, lambda m: bert_inputs(), {}),
    "mlp": (mlp, lambda m: {"input": torch.randn(4, 32, generator=torch.Generator().manual_seed(1))},
            {"example_inputs": (torch.randn(4, 32, generator=torch.Generator().manual_seed(2)),)}),
    "dit": (dit, _adapter_inputs, {}),
    "flux": (flux, _adapter_inputs, {}),
    "sd3": (sd3, _adapter_inputs, {}),
}


def output(model: nn.Module, kwargs: dict[str, Any]) -> torch.Tensor:
    """The tensor each architecture's users read: logits, token states, the predicted sample."""
    if isinstance(model, nn.Sequential):
        return model(kwargs["input"])
    out = model(**kwargs, return_dict=True) if "input_ids" in kwargs else model(**kwargs, return_dict=False)
    if isinstance(out, tuple):
        return out[0]
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


STEPS = [5, 17, 99, 3, 7, 9, 11, 12, 13, 14, 15, 16]


@torch.no_grad()
def last_logits_through(model: nn.Module, ids: torch.Tensor, cache: Any, steps: list[int]) -> torch.Tensor:
    """Last-position logits of a prefill of `ids` [1, S] and then of each token in `steps`, all through `cache`
    (one decode step per token): what two caches are compared on."""
    from optpass.hf_compat import with_cache

    seq = ids.shape[1]
    outs = [model(input_ids=ids, **with_cache(model, cache), use_cache=True).logits[:, -1]]
    for i, t in enumerate(steps):
        outs.append(model(input_ids=torch.tensor([[t]]), **with_cache(model, cache),
                          position_ids=torch.tensor([[seq + i]]), use_cache=True).logits[:, -1])
    return torch.stack(outs)
