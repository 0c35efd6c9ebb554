"""Interleaved timing: run every variant once per round, several rounds, report medians.

Both `optimize()` (predicted vs measured in the report) and `benchmarks/` use this, so every
speed figure optpass prints comes from the same protocol: same process, interleaved, median.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call for each named function, measured round-robin so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, counting shared storage once (tied embeddings)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def wrapped() -> object:
        with torch.inference_mode():
            return fn()

    return wrapped
