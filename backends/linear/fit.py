"""Attention transfer (LoLCATs stage 1): fit one layer's Hedgehog maps so that its hybrid attention reproduces
the layer's exact softmax attention outputs on calibration text, with every model weight frozen. The layer's
queries, keys and values are recorded once (after RoPE / norms, as the attention function receives them) and
the maps are trained on their own, one layer at a time: no backward pass through the model, so a layer costs
seconds, and each layer's error is measured against its own exact output (the ranking the pass converts by)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from optpass.backends.linear.feature_map import HedgehogMaps
from optpass.backends.linear.hybrid import mix, span_masks

STEPS = 300  # Adam steps per layer
ROWS = 64  # query rows per step (one contiguous chunk past the exact span)
LR = 1e-2
EVAL_ROWS = 256  # query rows, evenly spread past the span, the error is measured on


@dataclass(frozen=True)
class Record:
    """One layer's attention inputs over the calibration text: [1, H, S, D] each (key / value per key head)."""

    query: Tensor
    key: Tensor
    value: Tensor
    scale: float


@dataclass
class Fitted:
    """A layer's fitted maps, its relative output error (hybrid vs exact, on the evaluation rows) with the
    identity-initialised maps and after fitting, and the fitting time."""

    maps: HedgehogMaps
    error_before: float
    error_after: float
    seconds: float


@torch.no_grad()
def record_attention(model: nn.Module, input_ids: Tensor, layers: set[int] | None = None) -> dict[int, Record]:
    """layer index -> its prompt's q / k / v of one forward over `input_ids` [1, S] (the model's attention must
    go through optpass's function: `enable_compressed_attention`)."""
    from optpass.backends.kv.attention import observing_values

    seen: dict[int, Record] = {}

    def record(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: object, scale: float) -> None:
        idx = module.layer_idx
        if query.shape[2] > 1 and (layers is None or idx in layers):
            s = query.shape[2]
            seen[idx] = Record(*(t[:, :, :s].detach().float().clone() for t in (query, key, value)), scale)

    with observing_values(record):
        model(input_ids=input_ids, use_cache=False)
    return seen


def _exact(rec: Record, first: int, last: int) -> Tensor:
    """Exact causal softmax attention of query rows [first, last) over keys [0, last). [1, Hq, rows, D] fp32."""
    causal = torch.ones(last - first, last, dtype=torch.bool, device=rec.query.device).tril(first)
    return nn.functional.scaled_dot_product_attention(rec.query[:, :, first:last], rec.key[:, :, :last],
                                                      rec.value[:, :, :last], attn_mask=causal, scale=rec.scale,
                                                      enable_gqa=True)


def _hybrid(rec: Record, maps: HedgehogMaps, first: int, last: int, sink: int, window: int) -> Tensor:
    """The hybrid's output for query rows [first, last) (first >= sink + window, no padding) as the decode layer
    computes it: keys [sink, first - window] are linear for every row of the chunk and enter as one state (S, z);
    the sinks and keys from first - window + 1 on are scored per row. [1, Hq, rows, D]"""
    lo = first - window + 1
    device = rec.query.device
    pos = torch.cat([torch.arange(sink, device=device), torch.arange(lo, last, device=device)])
    rows = torch.arange(first, last, device=device)[:, None]
    near = ((pos < sink) | (rows - pos < window)) & (pos <= rows)
    far = (pos >= sink) & (rows - pos >= window)
    phi_past = maps.key(rec.key[:, :, sink:lo])
    state = (phi_past.transpose(-1, -2) @ rec.value[:, :, sink:lo], phi_past.sum(2))
    q, k, v = rec.query[:, :, first:last], rec.key[:, :, pos], rec.value[:, :, pos]
    return mix(q, k, v, maps.query(q), maps.key(k), near[None, None], far[None, None], rec.scale, maps.gain(),
               state=state)


@torch.no_grad()
def transfer_error(rec: Record, maps: HedgehogMaps, sink: int, window: int, rows: int = EVAL_ROWS) -> float:
    """Relative squared error ||hybrid - exact||^2 / ||exact||^2 over `rows` query rows evenly spread past the
    exact span (0.0 when the text is not longer than the span: the hybrid is then exact)."""
    seq = rec.query.shape[2]
    if seq <= sink + window:
        return 0.0
    pos = torch.linspace(sink + window, seq - 1, rows).round().long().unique().to(rec.query.device)
    near, far = (m[:, :, pos] for m in span_masks(None, seq, seq, sink, window, rec.query.device))
    q = rec.query[:, :, pos]
    want = nn.functional.scaled_dot_product_attention(q, rec.key, rec.value, attn_mask=near | far, scale=rec.scale,
                                                      enable_gqa=True)
    got = mix(q, rec.key, rec.value, maps.query(q), maps.key(rec.key), near, far, rec.scale, maps.gain())
    return float((got - want).pow(2).sum() / want.pow(2).sum().clamp_min(1e-30))


def fit_layer(rec: Record, sink: int, window: int, steps: int = STEPS, rows: int = ROWS, lr: float = LR,
              seed: int = 0) -> Fitted:
    """Fit a layer's maps by Adam on the mean squared error between its hybrid and exact outputs, each step on a
    random chunk of `rows` query rows past the span (rows inside it are exact either way)."""
    _, heads, seq, dim = rec.query.shape
    maps = HedgehogMaps(heads, rec.key.shape[1], dim).to(rec.query.device)
    before = transfer_error(rec, maps, sink, window)
    span = sink + window
    started = time.perf_counter()
    if seq > span:
        rows = min(rows, seq - span)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(maps.parameters(), lr=lr)
        for _ in range(steps):
            first = int(torch.randint(span, seq - rows + 1, (1,), generator=gen))
            with torch.no_grad():
                target = _exact(rec, first, first + rows)
            loss = (_hybrid(rec, maps, first, first + rows, sink, window) - target).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - started
    maps.requires_grad_(False)
    return Fitted(maps, before, transfer_error(rec, maps, sink, window), seconds)
