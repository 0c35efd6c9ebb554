"""TaylorSeer (Liu et al. 2025): forecast the cached blocks' residual by a Taylor expansion built from finite
differences of the residuals at computed steps, instead of copying it; compute every `threshold` steps.

`TaylorSeerGated` (confidence-gated, CG-Taylor style) also forecasts the first n blocks' residual, which are
always computed, and recomputes the rest only when that forecast's relative error reaches `threshold`:
a cheap, direct check of whether the expansion still holds at this step."""

from __future__ import annotations

from typing import Any, ClassVar

from optpass.errors import ConfigError
from optpass.passes.dit_caching.policy import FORECAST, CachePolicy, StepSignal, register_policy


class _Taylor(CachePolicy):
    skip_mode = FORECAST

    def __init__(self, threshold: float, warmup: int = 1, max_skip: int = 8, order: int = 1) -> None:
        super().__init__(threshold, warmup, max_skip)
        if order not in (0, 1, 2, 3):
            raise ConfigError(f"{self.name}: order={order}; allowed 0-3")
        self.order = int(order)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "order": self.order}


@register_policy
class TaylorSeer(_Taylor):
    name = "taylorseer"
    default_structure: ClassVar[tuple[int, int]] = (0, 0)

    def should_compute(self, signal: StepSignal) -> bool:
        interval = max(1, round(self.threshold))
        return (signal.step - self.warmup) % interval == 0


@register_policy
class TaylorSeerGated(_Taylor):
    name = "taylorseer_gated"
    signals = frozenset({"forecast_error"})
    default_structure: ClassVar[tuple[int, int]] = (1, 0)

    def should_compute(self, signal: StepSignal) -> bool:
        return signal.forecast_error is None or signal.forecast_error >= self.threshold
