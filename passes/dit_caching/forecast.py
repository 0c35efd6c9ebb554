"""Taylor forecasting of a residual from the values at computed steps (TaylorSeer's finite differences).

Keeps the last `order + 1` computed residuals and extrapolates with Newton's divided differences, which is
the Taylor expansion with finite-difference derivatives and also handles uneven step spacing. Memory is
bounded: `order + 1` tensors of the forecast segment's residual shape.
"""

from __future__ import annotations

import torch


class TaylorForecaster:
    """`update(step, value)` at computed steps; `predict(step)` anywhere after them."""

    def __init__(self, order: int) -> None:
        self.order = order
        self.steps: list[float] = []
        self.values: list[torch.Tensor] = []

    def reset(self) -> None:
        self.steps, self.values = [], []

    @property
    def ready(self) -> bool:
        return bool(self.values)

    def update(self, step: float, value: torch.Tensor) -> None:
        self.steps.append(float(step))
        self.values.append(value.detach())
        if len(self.values) > self.order + 1:
            self.steps.pop(0)
            self.values.pop(0)

    def predict(self, step: float) -> torch.Tensor:
        """Newton extrapolation through the stored points (order limited by how many there are)."""
        xs, coeffs = self.steps[::-1], list(self.values[::-1])  # newest first
        n = len(xs)
        for level in range(1, n):  # in-place divided differences: coeffs[i] = f[x_{i-level}..x_i]
            for i in range(n - 1, level - 1, -1):
                coeffs[i] = (coeffs[i] - coeffs[i - 1]) / (xs[i] - xs[i - level])
        out, basis = coeffs[0], 1.0
        for i in range(1, n):
            basis = basis * (step - xs[i - 1])
            out = out + coeffs[i] * basis
        return out
