"""Roofline estimates: t = max(flops / (peak * eff), bytes / (bw * eff), launch) per op, and the
`RewriteEstimate` every `Candidate` carries (before, after, deltas, crossover)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from optpass.cost_models.hardware import HardwareSpec

_CANONICAL = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class RewriteEstimate:
    """Predicted seconds and peak-memory bytes before/after a rewrite, at the shape it was estimated for."""

    before: float
    after: float
    d_peak_memory: float
    # prefill length S (batch 1) where the gain changes sign (first flip; `explain` says which side pays);
    # None: the sign never flips up to 8k tokens
    crossover: float | None = None
    tokens: int = 1

    @property
    def d_latency(self) -> float:
        return self.after - self.before

    @property
    def relative_gain(self) -> float:
        return -self.d_latency / self.before if self.before > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "d_latency": self.d_latency, "relative_gain": self.relative_gain}


def canonical_dtype(dtype: str) -> str:
    """`float32` -> `fp32` etc., the keys of `HardwareSpec.peak_flops`."""
    return _CANONICAL.get(dtype.replace("torch.", ""), dtype)


def op_time(flops: float, bytes_moved: float, spec: HardwareSpec, dtype: str, kind: str = "matmul") -> float:
    """Roofline time of one op on `spec`."""
    eff = spec.efficiency.get(kind, 0.7)
    compute = flops / (spec.flops(canonical_dtype(dtype)) * eff) if flops else 0.0
    memory = bytes_moved / (spec.mem_bandwidth * spec.efficiency.get("memory", 0.8))
    return max(compute, memory, spec.launch_floor)
