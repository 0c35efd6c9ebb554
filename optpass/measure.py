"""Interleaved timing: run every variant once per round (rotating order), several rounds, report medians.

Both `optimize()` (predicted vs measured in the report) and `benchmarks/` use this, so every
speed figure optpass prints comes from the same protocol: same process, interleaved, median.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn


def rotated(items: list, round_index: int) -> list:
    """The round's order: it starts one item later each round, so no variant always runs right after the same
    neighbour (whose allocations and cache footprint it would inherit every time)."""
    k = round_index % len(items) if items else 0
    return items[k:] + items[:k]


def interleaved_rounds(fns: dict[str, Callable[[], dict[str, float]]], rounds: int = 5, warmup: int = 1,
                       on_round: Callable[[int], None] | None = None) -> dict[str, dict[str, list[float]]]:
    """Each named measurement (a call returning metrics) once per round, in rotating order, `rounds` times:
    {name: {metric: [one value per round]}}. The one protocol behind every speed figure optpass prints."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in fns}
    for r in range(rounds):
        for name in rotated(list(fns), r):
            for key, value in fns[name]().items():
                samples[name].setdefault(key, []).append(value)
        if on_round is not None:
            on_round(r)
    return samples


def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int = 5, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call for each named function, by `interleaved_rounds`."""
    def timed(fn: Callable[[], object]) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            start = time.perf_counter()
            fn()
            return {"s": time.perf_counter() - start}
        return run

    samples = interleaved_rounds({name: timed(fn) for name, fn in fns.items()}, rounds, warmup)
    return {name: metrics.get("s", []) for name, metrics in samples.items()}


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
