"""Per-layer KV budgets as weights with mean 1 (the cache multiplies its base capacity by them).

- uniform: every layer the same;
- pyramid (PyramidKV): linearly more for shallow layers, fewer for deep ones;
- density: measured. Shallow layers attend broadly and deep ones sharply, so each layer's budget follows the
  number of keys needed to cover 90% of the attention mass of the prompt's last queries, measured on
  calibration text.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from optpass.backends.kv.attention import rope_for
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
    """Per layer: the mean fraction of keys holding `mass` of the attention of the last `queries` queries."""
    captured: dict[int, list[float]] = {}

    def hook(layer_idx: int) -> Callable:
        def fn(module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            b, s, _ = hidden.shape
            q = module.q_proj(hidden).view(b, s, -1, module.head_dim).transpose(1, 2)
            k = module.k_proj(hidden).view(b, s, -1, module.head_dim).transpose(1, 2)
            cos, sin = kwargs["position_embeddings"]
            q, k = rope_for(type(module))(q, k, cos, sin)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            n = min(queries, s)
            logits = (q[:, :, -n:] @ k.transpose(-1, -2)) * module.scaling
            causal = torch.arange(s)[None, :] > torch.arange(s - n, s)[:, None]
            probs = logits.masked_fill(causal, float("-inf")).softmax(-1)
            sorted_p = probs.sort(-1, descending=True).values.cumsum(-1)
            needed = (sorted_p < mass).sum(-1).float() + 1
            visible = torch.arange(s - n, s).float() + 1
            captured.setdefault(layer_idx, []).append(float((needed / visible).mean()))
        return fn

    handles = [m.register_forward_hook(hook(i), with_kwargs=True)
               for i, m in enumerate(m for name, m in model.named_modules() if name.endswith("self_attn"))]
    try:
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
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
