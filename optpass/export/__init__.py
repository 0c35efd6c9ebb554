"""Writers for formats other engines serve: `optpass.save(model, path, format=...)` routes through `EXPORTERS`.

- "optpass": optpass's own checkpoint (`optpass.checkpoint`), reloaded by `optpass.load` with every decision;
- "gguf": one .gguf file for llama.cpp / Ollama (`optpass.export.gguf`);
- "compressed-tensors": a Hugging Face directory that stock transformers and vLLM load
  (`optpass.export.compressed_tensors`).

Each entry names its module and function, imported on use: `import optpass` needs neither `gguf` nor
`compressed-tensors` (the `optpass[export]` extra).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from torch import nn

from optpass.errors import ConfigError, ExportError

Exporter = Callable[..., Path]  # (model, path, tokenizer, **options) -> the path written

# format -> (module, function, the package it needs or None)
EXPORTERS: dict[str, tuple[str, str, str | None]] = {
    "optpass": ("optpass.checkpoint", "write_checkpoint", None),
    "gguf": ("optpass.export.gguf", "write_gguf", "gguf"),
    "compressed-tensors": ("optpass.export.compressed_tensors", "write_compressed_tensors", "compressed_tensors"),
}
FORMATS = tuple(EXPORTERS)


def check_format(name: str) -> None:
    """Raise `ConfigError` for an unknown format name (the CLI calls it before loading any model)."""
    if name not in EXPORTERS:
        raise ConfigError(f"unknown export format {name!r}; formats: {', '.join(FORMATS)}")


def check_destination(name: str, path: str | Path) -> None:
    """The path shape each format writes: a .gguf file for "gguf", a directory for the others."""
    check_format(name)
    if name == "gguf" and Path(path).suffix != ".gguf":
        raise ExportError(f"gguf export: {path} must be a file name ending in .gguf")
    if name != "gguf" and Path(path).suffix == ".gguf":
        raise ExportError(f"{path}: format {name!r} writes a directory; use format='gguf' for a .gguf file")


def preflight(name: str, model: nn.Module) -> None:
    """Refuse, before any optimization work, a model the format cannot express (GGUF: Llama only)."""
    check_format(name)
    if name == "gguf":
        from optpass.export.gguf import check_llama

        check_llama(model)
    elif name == "compressed-tensors" and not type(model).__module__.startswith("transformers"):
        raise ExportError(f"compressed-tensors export: {type(model).__name__} is not a transformers model")


def get_exporter(name: str) -> Exporter:
    """The writer for `name`; a missing optional package is an `ExportError` that says what to install."""
    check_format(name)
    module, function, package = EXPORTERS[name]
    if package is not None and importlib.util.find_spec(package) is None:
        raise ExportError(f"format {name!r} needs the `{package.replace('_', '-')}` package: "
                          "pip install 'optpass[export]'")
    return getattr(importlib.import_module(module), function)
