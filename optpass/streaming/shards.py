"""Lazy reads from a Hugging Face checkpoint's safetensors shards (`model.safetensors` or a sharded set with
`model.safetensors.index.json`): one tensor at a time, never the whole file.

`safe_open` maps the shard; a tensor it returns is a view of that mapping, and every page touched while a
mapping is open stays resident. So each read opens its own handle and returns a private fp32 copy: a finished
block leaves no file pages behind, and the process holds what the caller keeps, nothing more.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from optpass.errors import UnsupportedModelError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class ShardReader:
    """Tensor name -> shard file, read on demand as fp32 copies (`read`)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            self.files = {name: self.directory / file for name, file in weight_map.items()}
        elif (self.directory / SINGLE_FILE).exists():
            self.files = {name: self.directory / SINGLE_FILE for name in _header(self.directory / SINGLE_FILE)}
        else:
            raise UnsupportedModelError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}; block-by-block "
                                        "quantization reads safetensors checkpoints only")
        missing = sorted({str(f) for f in self.files.values() if not f.exists()})
        if missing:
            raise UnsupportedModelError(f"{self.directory}: shard file(s) listed in {INDEX_FILE} are missing: {missing}")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self) -> list[str]:
        return list(self.files)

    def read(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor `name` as a private copy in `dtype` (the shard's mapping is closed on return)."""
        from safetensors import safe_open

        if name not in self.files:
            raise UnsupportedModelError(f"{self.directory}: tensor {name!r} is not in the checkpoint")
        with safe_open(str(self.files[name]), framework="pt") as f:
            view = f.get_tensor(name)
            return view.to(dtype, copy=True)

    def stored_bytes(self) -> int:
        """Bytes of all tensors as stored (from the shard headers; nothing is read)."""
        total = 0
        for file in sorted(set(self.files.values())):
            for info in _header(file).values():
                total += _numel(info["shape"]) * _DTYPE_BYTES.get(info["dtype"], 4)
        return total

    def fp32_bytes(self) -> int:
        """Bytes of the floating-point tensors once upcast to fp32, as `from_pretrained(dtype=float32)` holds them."""
        total = 0
        for file in sorted(set(self.files.values())):
            for info in _header(file).values():
                floating = info["dtype"] in ("F64", "F32", "F16", "BF16")
                total += _numel(info["shape"]) * (4 if floating else _DTYPE_BYTES.get(info["dtype"], 4))
        return total


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _header(path: Path) -> dict[str, dict]:
    """A safetensors file's tensor entries (the JSON header, without `__metadata__`)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header
