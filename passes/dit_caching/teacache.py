"""TeaCache (Liu et al. 2024): accumulate the relative L1 change of the first block's timestep-modulated
input across steps and recompute once the sum reaches `threshold` (then start summing again).

The modulated input (AdaLN-Zero norm1 output for a diffusers DiT, the stack input for a plain DiT) tracks
the output change well because it folds in the timestep embedding, and it costs one norm, not a block."""

from __future__ import annotations

from typing import ClassVar

from optpass.passes.dit_caching.policy import CachePolicy, StepSignal, register_policy


@register_policy
class TeaCache(CachePolicy):
    name = "teacache"
    signals = frozenset({"modulated_change"})
    default_structure: ClassVar[tuple[int, int]] = (0, 0)

    def __init__(self, threshold: float, warmup: int = 1, max_skip: int = 8) -> None:
        super().__init__(threshold, warmup, max_skip)
        self.accumulated = 0.0

    def reset(self) -> None:
        super().reset()
        self.accumulated = 0.0

    def should_compute(self, signal: StepSignal) -> bool:
        self.accumulated += signal.modulated_change or 0.0
        if self.accumulated >= self.threshold:
            self.accumulated = 0.0
            return True
        return False
