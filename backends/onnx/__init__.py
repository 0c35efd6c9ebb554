"""ONNX: export an optpass-optimized LM with MatMulNBits and a KV cache (`export_onnx`), run it in ONNX Runtime
(`OrtCausalLM`), and optimize an ONNX graph as input (`optimize_onnx`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optpass.backends.onnx.export import export_onnx
    from optpass.backends.onnx.optimize import optimize_onnx
    from optpass.backends.onnx.runtime import OrtCausalLM

__all__ = ["OrtCausalLM", "export_onnx", "optimize_onnx"]
_HOME = {"export_onnx": "export", "optimize_onnx": "optimize", "OrtCausalLM": "runtime"}


def __getattr__(name: str) -> Any:
    """Lazy: importing optpass.backends.onnx does not import torch.onnx / onnxruntime until used."""
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f"optpass.backends.onnx.{_HOME[name]}"), name)
    raise AttributeError(name)
