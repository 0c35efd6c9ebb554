"""Where a model comes from: one resolver shared by `optimize("name")`, the CLI and `optpass bench`.

A spec is a built-in name (`optpass.models.BUILTIN_MODELS`), an optpass checkpoint directory, a Hugging
Face model directory (transformers `config.json` or a diffusers model config), or a GGUF file (dequantized
once with transformers and cached as safetensors, like the built-in SmolLM2). ONNX files are not modules:
they go to `optpass.backends.onnx.optimize_onnx` (`is_onnx`). Nothing is fetched from a hub.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optpass.errors import UnsupportedModelError


def is_onnx(spec: str) -> bool:
    return str(spec).lower().endswith(".onnx")


def _describe() -> str:
    from optpass.models import BUILTIN_MODELS

    return (f"built-in names: {', '.join(sorted(BUILTIN_MODELS))}; or a path to a Hugging Face model directory, "
            "an optpass checkpoint directory, a .gguf file or an .onnx file")


def _local_tokenizer(path: Path) -> Any | None:
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _load_hf_dir(path: Path) -> tuple[nn.Module, Any]:
    config = json.loads((path / "config.json").read_text())
    if "_diffusers_version" in config:
        import diffusers

        cls = getattr(diffusers, config.get("_class_name", ""), None)
        if cls is None:
            raise UnsupportedModelError(f"{path}: diffusers class {config.get('_class_name')!r} is not available")
        return cls.from_pretrained(str(path), local_files_only=True).eval(), None
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    return model.eval(), _local_tokenizer(path)


def _load_gguf(path: Path) -> tuple[nn.Module, Any]:
    from optpass.models import _convert_gguf, cache_dir

    key = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    out = cache_dir() / f"gguf-{path.stem}-{key}"
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(path, out)
    return _load_hf_dir(out)


def load_model_source(spec: str | Path) -> tuple[nn.Module, Any]:
    """Resolve `spec` (see the module docstring) -> `(model, tokenizer or None)`, the model in eval mode."""
    from optpass.checkpoint import STATE_FILE, load
    from optpass.models import BUILTIN_MODELS, load_builtin

    text = str(spec)
    if text in BUILTIN_MODELS:
        return load_builtin(text)
    path = Path(text)
    if is_onnx(text):
        raise UnsupportedModelError(f"{text}: an ONNX file is optimized with optpass.backends.onnx.optimize_onnx "
                                    "(`optpass optimize model.onnx`), not loaded as a torch module")
    if path.is_dir() and (path / STATE_FILE).exists():
        return load(path), _local_tokenizer(path)
    if path.is_dir() and (path / "config.json").exists():
        return _load_hf_dir(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _load_gguf(path)
    if path.exists():
        raise UnsupportedModelError(f"{text}: not a model optpass can read; {_describe()}")
    raise unknown_model(text)


def unknown_model(spec: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"unknown model {spec!r}: no such built-in name or path; {_describe()}")
