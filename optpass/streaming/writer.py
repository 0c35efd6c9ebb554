"""An incremental safetensors writer: the header (every tensor's name, dtype, shape and offsets) is known
before any data exists, so blocks are appended as they are quantized and freed; the file is byte-for-byte a
safetensors file that `safetensors.torch.load_file` (and so `optpass.load`) reads.

Each tensor is checked against its declared dtype and shape as it is written, and `close` refuses a file
with tensors missing: a layout mistake fails here, not as a corrupt checkpoint later.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsWriter:
    """Write `specs` in order; `sha256` (of the whole file) and `bytes` are ready after `close`."""

    def __init__(self, path: str | Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.specs = list(specs)
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError("SafetensorsWriter: a tensor name is declared twice")
        header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for spec in self.specs:
            header[spec.name] = {"dtype": DTYPES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data buffer to 8 bytes
        self._hash = hashlib.sha256()
        self._file = open(self.path, "wb")
        self._emit(len(raw).to_bytes(8, "little") + raw)
        self._next = 0
        self.bytes = 8 + len(raw) + offset
        self.sha256 = ""

    def _emit(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._hash.update(data)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next declared tensor (names must come in declaration order)."""
        if self._next >= len(self.specs):
            raise ValueError(f"SafetensorsWriter: {name} written after every declared tensor")
        spec = self.specs[self._next]
        if name != spec.name:
            raise ValueError(f"SafetensorsWriter: expected {spec.name} next, got {name}")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"SafetensorsWriter: {name} is {tensor.dtype} {tuple(tensor.shape)}, declared "
                             f"{spec.dtype} {spec.shape}")
        flat = tensor.detach().contiguous().view(-1).view(torch.uint8) if tensor.numel() else tensor.new_empty(0, dtype=torch.uint8)
        self._emit(memoryview(flat.numpy()))
        self._next += 1

    def abort(self) -> None:
        """Close and delete a partial file (a failed run leaves no checkpoint that looks whole)."""
        self._file.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Finish the file; raises if a declared tensor was never written."""
        self._file.close()
        if self._next != len(self.specs):
            missing = [s.name for s in self.specs[self._next:]]
            self.path.unlink(missing_ok=True)
            raise ValueError(f"SafetensorsWriter: {len(missing)} declared tensor(s) never written, e.g. {missing[:3]}")
        self.sha256 = self._hash.hexdigest()
