"""Sparse attention patterns, one per file: each writes only `block_mask()`, the key blocks each query block
attends (a `layout.py` layout); causality, padding and the ragged tail are the lowering's job.

`PATTERNS` maps a name to its class; `make_pattern({"name": ..., **params})` builds one from the record a plan
or checkpoint stores. Static patterns ignore the call's queries and keys; online ones (`online = True`) choose
blocks from them at every prefill.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from torch import Tensor

from optpass.errors import ConfigError

PATTERNS: dict[str, type[Pattern]] = {}


def register_pattern(cls: type[Pattern]) -> type[Pattern]:
    PATTERNS[cls.name] = cls
    return cls


@dataclass(frozen=True)
class Pattern(ABC):
    name: ClassVar[str]
    online: ClassVar[bool] = False

    @abstractmethod
    def block_mask(self, query: Tensor, key: Tensor, block: int) -> Tensor:
        """keep [B or 1, H or 1, nQ, nK] bool for `query [B, H, S, D]` and `key [B, H, S, D]` (key heads
        already repeated to the query heads), blocks of `block` tokens."""

    def estimation_cost(self, block: int) -> float:
        """Work of choosing the blocks online, as a share of dense causal attention's (the cost model adds it)."""
        return 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}

    @property
    def label(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in asdict(self).items())
        return f"{self.name}({params})"


def make_pattern(spec: dict[str, Any]) -> Pattern:
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in PATTERNS:
        raise ConfigError(f"unknown sparse attention pattern {name!r}; known: {sorted(PATTERNS)}")
    try:
        return PATTERNS[name](**spec)
    except TypeError as e:
        raise ConfigError(f"sparse attention pattern {name!r}: bad parameters {spec} ({e})") from e


from optpass.backends.sparse.patterns import a_shape, block_topp, dense, local_2d, vertical_slash  # noqa: E402,F401
