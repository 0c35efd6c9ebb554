"""Fixed-interval reuse (FORA, Selvaraju et al. 2024; Delta-DiT, Chen et al. 2024): run the cached blocks
every `interval` steps and reuse their residual in between. No signal needed; `threshold` is the interval."""

from __future__ import annotations

from typing import ClassVar

from optpass.passes.dit_caching.policy import CachePolicy, StepSignal, register_policy


@register_policy
class FixedInterval(CachePolicy):
    name = "fixed_interval"
    default_structure: ClassVar[tuple[int, int]] = (0, 0)

    def should_compute(self, signal: StepSignal) -> bool:
        interval = max(1, round(self.threshold))
        return (signal.step - self.warmup) % interval == 0
