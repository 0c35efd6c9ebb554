"""Per-layer KV budgets as weights with mean 1 (the cache multiplies its base capacity by them).

- uniform: every layer the same;
- pyramid (PyramidKV): linearly more for shallow layers, fewer for deep ones;
- density: measured. Shallow layers attend broadly and deep ones sharply, so each layer's budget follows the
  number of keys needed to cover 90% of the attention mass of the prompt's last queries, measured on
  calibration text.
"""

from __future__ import annotations

import torch
from torch import nn

from optpass.errors import ConfigError

SCHEDULES = ("uniform", "pyramid", "density")
PYRAMID_SLOPE = 0.5  # first layer gets 1 + slope, last 1 - slope


def uniform(num_layers: int) -> tuple[float, ...]:
    return (1.0,) * num_layers


def pyramid(num_layers: int, slope: float = PYRAMID_SLOPE) -> tuple[float, ...]:
    if num_layers == 1:
        return (1.0,)
    return tuple(1 + slope * (1 - 2 * i / (num_layers - 1)) for i in range(num_layers))


@torch.no_grad()
def attention_density(model: nn.Module, batches: list[torch.Tensor], mass: float = 0.9, queries: int = 16) -> list[float]:
    """Per layer: the mean fraction of keys holding `mass` of the attention of the last `queries` queries.
    Reads the queries and keys the model hands its attention function (optpass's must be enabled), so the
    model's own projections, norms and RoPE are what is measured."""
    from optpass.backends.kv.attention import observing

    captured: dict[int, list[float]] = {}

    def observe(module: nn.Module, q: torch.Tensor, k: torch.Tensor, mask: object, scaling: float) -> None:
        s = q.shape[2]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        n = min(queries, s)
        logits = (q[:, :, -n:].float() @ k.float().transpose(-1, -2)) * scaling
        causal = torch.arange(s)[None, :] > torch.arange(s - n, s)[:, None]
        probs = logits.masked_fill(causal, float("-inf")).softmax(-1)
        sorted_p = probs.sort(-1, descending=True).values.cumsum(-1)
        needed = (sorted_p < mass).sum(-1).float() + 1
        visible = torch.arange(s - n, s).float() + 1
        captured.setdefault(getattr(module, "layer_idx", len(captured)), []).append(float((needed / visible).mean()))

    with observing(observe):
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    return [sum(v) / len(v) for _, v in sorted(captured.items())]


def density(densities: list[float], floor: float = 0.25) -> tuple[float, ...]:
    """Budget weights proportional to measured density (mean 1), each at least `floor`."""
    mean = sum(densities) / len(densities)
    raw = [max(d / mean, floor) for d in densities]
    norm = sum(raw) / len(raw)
    return tuple(r / norm for r in raw)


def schedule_weights(name: str, num_layers: int, densities: list[float] | None = None) -> tuple[float, ...]:
    if name == "uniform":
        return uniform(num_layers)
    if name == "pyramid":
        return pyramid(num_layers)
    if name == "density":
        if densities is None:
            raise ConfigError("the 'density' KV budget schedule needs measured densities (calibration data)")
        return density(densities)
    raise ConfigError(f"unknown KV budget schedule {name!r}; known: {', '.join(SCHEDULES)}")
