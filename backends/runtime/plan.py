"""`DecodePlan`: what the applied passes contribute to generation, assembled once by the pass manager.

A pass never touches `generate()`; its `PassResult.runtime` says what it adds (a compiled step, a compressed
cache layout, a proposer, a layer-skip schedule), and `DecodePlan.merge` combines them. The plan
is what a checkpoint records and what `install_runtime` builds the runtime from.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from optpass.errors import ConfigError


@dataclass(frozen=True)
class DecodePlan:
    compiled_step: bool = False  # a compiled static-shape decode step (the quantize pass asks for it)
    max_cache_len: int = 1024  # longest prompt + new tokens of the static full-attention cache
    kv: dict[str, Any] | None = None  # compressed-cache settings (KVSettings fields), from the kv_cache pass
    # a drafter whose proposals the runtime verifies k at a time: {"kind", "draft": k, "verify_cost", options}
    proposer: dict[str, Any] | None = None
    # a per-position layer-skip schedule {block index: first skipped position}, from the dynamic_skip pass
    skip: dict[str, int] | None = None
    contributors: tuple[str, ...] = field(default=())  # which passes contributed what (for the report)

    FIELDS = ("compiled_step", "max_cache_len", "kv", "proposer", "skip")

    def merge(self, pass_name: str, contribution: dict[str, Any]) -> DecodePlan:
        unknown = set(contribution) - set(self.FIELDS)
        if unknown:
            raise ConfigError(f"pass {pass_name!r} contributes unknown runtime parts {sorted(unknown)}; known: {self.FIELDS}")
        return replace(self, **contribution, contributors=self.contributors + (pass_name,))

    @property
    def empty(self) -> bool:
        return not self.compiled_step and self.kv is None

    def kv_settings(self) -> Any:
        from optpass.backends.kv import KVSettings

        if self.kv is None:
            return None
        data = dict(self.kv)
        if data.get("layer_weights") is not None:
            data["layer_weights"] = tuple(data["layer_weights"])
        return KVSettings(**data)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["contributors"] = list(self.contributors)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecodePlan:
        data = dict(data)
        data["contributors"] = tuple(data.get("contributors", ()))
        return cls(**data)
