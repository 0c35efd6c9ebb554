"""First-block residual cache (First-Block-Cache / DBCache "F1B0"): always run the first n blocks, and reuse
the rest when their residual changed less than `threshold` (relative L1) since the last computed step."""

from __future__ import annotations

from typing import ClassVar

from optpass.passes.dit_caching.policy import CachePolicy, StepSignal, register_policy


@register_policy
class FirstBlockResidual(CachePolicy):
    name = "first_block"
    signals = frozenset({"probe_change"})
    default_structure: ClassVar[tuple[int, int]] = (1, 0)

    def should_compute(self, signal: StepSignal) -> bool:
        return signal.probe_change is None or signal.probe_change >= self.threshold
