"""The DiT cache policy interface: per denoising step, compute the cached blocks, reuse them, or forecast them.

A policy sees one `StepSignal` per step (step index, timestep, how much the first blocks' residual and the
timestep-modulated input changed) and answers `should_compute`. The base class owns the mechanics every
policy shares: warm-up steps, a cap on consecutive skipped steps, and "nothing cached yet => compute".
Policies register by name, so `make_policy("teacache", threshold=0.3)` rebuilds one from a saved record.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from optpass.errors import ConfigError

COMPUTE, REUSE, FORECAST = "compute", "reuse", "forecast"


@dataclass(frozen=True)
class StepSignal:
    """What a policy may look at when deciding one step. Changes are relative L1 (mean |a-b| / mean |b|)."""

    step: int  # 0-based index within the current generation
    timestep: float
    probe_change: float | None = None  # first n blocks' residual vs the one at the last computed step
    modulated_change: float | None = None  # first block's modulated input vs the previous step
    forecast_error: float | None = None  # first blocks' residual vs its Taylor forecast (confidence gate)


class CachePolicy(ABC):
    """Decide per step whether the cached (middle) blocks run. Subclasses implement `should_compute`."""

    name: ClassVar[str]
    skip_mode: ClassVar[str] = REUSE  # what a skipped step does: REUSE the residual or FORECAST it
    signals: ClassVar[frozenset[str]] = frozenset()  # which StepSignal fields the stack must compute
    default_structure: ClassVar[tuple[int, int]] = (0, 0)  # (first n always computed, last m always computed)

    def __init__(self, threshold: float, warmup: int = 1, max_skip: int = 8, **extra: Any) -> None:
        if threshold < 0:
            raise ConfigError(f"{self.name}: threshold={threshold} must be >= 0")
        if warmup < 1 or max_skip < 0:
            raise ConfigError(f"{self.name}: warmup={warmup} must be >= 1 and max_skip={max_skip} >= 0")
        self.threshold, self.warmup, self.max_skip = float(threshold), int(warmup), int(max_skip)
        self.skipped_in_row = 0
        self.computed_steps: list[int] = []

    def params(self) -> dict[str, Any]:
        """JSON-able constructor arguments (what a checkpoint stores)."""
        return {"threshold": self.threshold, "warmup": self.warmup, "max_skip": self.max_skip}

    def reset(self) -> None:
        """Forget the previous generation."""
        self.skipped_in_row = 0
        self.computed_steps = []

    @abstractmethod
    def should_compute(self, signal: StepSignal) -> bool:
        """True: run the cached blocks this step. Only asked when skipping is allowed at all."""

    def decide(self, signal: StepSignal, have_cache: bool) -> str:
        """COMPUTE, or this policy's skip mode; warm-up, the skip cap and an empty cache force COMPUTE."""
        forced = not have_cache or signal.step < self.warmup or self.skipped_in_row >= self.max_skip
        if forced or self.should_compute(signal):
            self.skipped_in_row = 0
            self.computed_steps.append(signal.step)
            return COMPUTE
        self.skipped_in_row += 1
        return self.skip_mode


POLICIES: dict[str, type[CachePolicy]] = {}
P = TypeVar("P", bound=type[CachePolicy])


def register_policy(cls: P) -> P:
    POLICIES[cls.name] = cls
    return cls


def make_policy(name: str, **params: Any) -> CachePolicy:
    """Build a registered policy by name; unknown names list the registered ones."""
    if name not in POLICIES:
        raise ConfigError(f"unknown DiT cache policy {name!r}; registered: {', '.join(sorted(POLICIES))}")
    return POLICIES[name](**params)
