"""CLI helpers that turn files into what `optimize()` takes: a calibration text file into token windows,
an ONNX path into a call of part B's `optimize_onnx` (a clear error while that backend is missing)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from optpass.errors import UnsupportedModelError

CALIBRATION_WINDOW = 256
MAX_WINDOWS = 8


def calibration_tokens(path: str, tokenizer: Any) -> torch.Tensor:
    """Token ids [n, 256] (up to 8 windows) of a text file, for `optimize(calibration_data=...)`."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--calibration {path}: no such file")
    if tokenizer is None:
        raise UnsupportedModelError(f"--calibration {path}: this model has no local tokenizer to tokenize text with")
    ids = tokenizer(file.read_text(errors="replace"), add_special_tokens=False, return_tensors="pt").input_ids[0]
    window = min(CALIBRATION_WINDOW, ids.numel())
    if window < 16:
        raise UnsupportedModelError(f"--calibration {path}: only {ids.numel()} tokens; give at least 16")
    n = min(MAX_WINDOWS, ids.numel() // window)
    return ids[: n * window].view(n, window)


def optimize_onnx_file(args: argparse.Namespace, passes: Any) -> Any:
    """Delegate an .onnx MODEL to `optpass.backends.onnx.optimize_onnx`; returns its report."""
    try:
        from optpass.backends.onnx import optimize_onnx
    except ImportError as e:
        raise UnsupportedModelError(f"{args.model}: ONNX input needs optpass.backends.onnx.optimize_onnx, which this "
                                    f"install does not provide ({e})") from e
    if not Path(args.model).is_file():
        raise FileNotFoundError(f"{args.model}: no such ONNX file")
    output = args.output or str(Path(args.model).with_suffix(".optpass.onnx"))
    args.output = output
    result = optimize_onnx(args.model, target=args.target, passes=passes, quality_budget=args.quality_budget,
                           output=output)
    return result.report
