"""`export_onnx(model, path)`: an (optpass-optimized) Llama-family LM -> one ONNX decode graph with an
explicit KV cache, optpass's int4 / int8 linears as `com.microsoft::MatMulNBits`, via
`torch.onnx.export(dynamo=True)` and a custom translation table. Writes `<path>` (weights embedded) and
`<path>.json` (the `DecoderSpec` a runner needs: layers, KV heads, head dim, EOS).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optpass.backends.onnx.decoder import DecoderSpec, KVDecoder
from optpass.backends.onnx.matmul_nbits import TRANSLATIONS
from optpass.errors import OptpassError

OPSET = 18


class OnnxExportError(OptpassError):
    """torch.onnx could not export the model; the message names the step and the cause."""


@dataclass
class ExportResult:
    path: Path
    spec: DecoderSpec
    op_counts: dict[str, int] = field(default_factory=dict)
    bytes: int = 0


def spec_path(path: str | os.PathLike) -> Path:
    return Path(f"{path}.json")


def export_onnx(model: nn.Module, path: str | os.PathLike, accuracy_level: int | None = None,
                opset: int = OPSET) -> ExportResult:
    """Export `model`'s decode step (see `backends/onnx/decoder.py`) to `path`.

    accuracy_level: MatMulNBits' compute type. 0 / None (default): fp32 activations, the PyTorch module's math
    (int8 layers as two int4 nibble halves, `matmul_nbits.split_int8`, since ORT's bits=8 kernel at level 0
    dequantizes the weight on every call); 4: activations quantized to int8 per block (int8 as one bits=8
    node), faster per layer in isolation but it moves SmolLM2's top-1 by 2.5-4.5%.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    decoder = KVDecoder(model, accuracy_level).eval()
    spec = decoder.spec
    ids = torch.zeros(1, 3, dtype=torch.long)
    past = decoder.empty_past(1, 2)
    # batch stays 1 (greedy decoding of one sequence): a symbolic batch costs ~40% more export time
    seq, past_len = torch.export.Dim("seq"), torch.export.Dim("past")
    dynamic = ({1: seq}, tuple({2: past_len} for _ in past))  # *past is one tuple
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                decoder, (ids, *past), dynamo=True, dynamic_shapes=dynamic, input_names=spec.input_names(),
                output_names=spec.output_names(), custom_translation_table=TRANSLATIONS, opset_version=opset,
                optimize=True, verbose=False)
    except Exception as e:  # noqa: BLE001 - re-raised typed, with the cause chained
        raise OnnxExportError(f"ONNX export of {type(model).__name__} failed: {type(e).__name__}: {e}") from e
    tmp = path.with_name(path.name + ".tmp")
    program.save(str(tmp), external_data=False)
    os.replace(tmp, path)
    spec_path(path).write_text(json.dumps(spec.to_dict(), indent=2))
    ops = Counter(f"{n.domain + '::' if n.domain else ''}{n.op_type}" for n in program.model.graph)
    return ExportResult(path, spec, dict(ops), path.stat().st_size)


def load_spec(path: str | os.PathLike) -> DecoderSpec:
    """The DecoderSpec written beside an exported model."""
    data: dict[str, Any] = json.loads(spec_path(path).read_text())
    return DecoderSpec(**data)
