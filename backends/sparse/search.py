"""Per-head pattern search: the cheapest pattern that keeps a target share of each head's attention mass.

One dense forward over calibration text records every layer's queries and keys (after RoPE and norms). Per
layer, the exact attention mass each query block puts on each key block is computed once (`block_mass`, chunked
over query blocks, causal); every candidate pattern is then asked for its layout on the same queries and keys
(online patterns choose blocks exactly as they will at inference) and scored by the mass its kept blocks hold
(`coverage`). `choose` picks, per head, the lowest-density candidate whose coverage reaches the target, or keeps
the head dense. Coverage and density are the figures the report shows per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from optpass.backends.sparse.layout import clip_causal, density, num_blocks
from optpass.backends.sparse.patterns import make_pattern

DENSE = {"name": "dense"}
DEFAULT_CANDIDATES: tuple[dict[str, Any], ...] = (
    *({"name": "a_shape", "sink": 64, "window": w} for w in (128, 256, 512, 1024, 2048)),
    *({"name": "block_topp", "p": p, "samples": 2} for p in (0.8, 0.9, 0.95)),
    *({"name": "vertical_slash", "vertical": v, "slash": s, "last": 64} for v, s in ((16, 4), (64, 16), (256, 64))),
)


@dataclass
class HeadScores:
    """Per candidate (by index into `candidates`), coverage and density per query head [H] at one layer."""

    candidates: list[dict[str, Any]]
    coverage: Tensor  # [C, H]
    density: Tensor  # [C, H]


@torch.no_grad()
def capture_queries_keys(model: nn.Module, input_ids: Tensor) -> dict[int, tuple[Tensor, Tensor, float]]:
    """layer index -> (query [1, H, S, D], key [1, Hk, S, D], scale) of one forward over `input_ids [1, S]`."""
    from optpass.backends.kv.attention import observing

    seen: dict[int, tuple[Tensor, Tensor, float]] = {}

    def record(module: nn.Module, query: Tensor, key: Tensor, mask: Any, scale: float) -> None:
        if query.shape[2] > 1:
            seen[module.layer_idx] = (query.detach().clone(), key[:, :, :query.shape[2]].detach().clone(), scale)

    with observing(record):
        model(input_ids=input_ids, use_cache=False)
    return seen


def block_mass(query: Tensor, key: Tensor, block: int, scale: float, chunk_blocks: int = 8) -> Tensor:
    """[H, nQ, nK]: per query block, the mean over its queries of the exact causal attention probability on each
    key block (each row sums to 1). Batch 1."""
    _, heads, seq, _ = query.shape
    if key.shape[1] != heads:
        key = key.repeat_interleave(heads // key.shape[1], 1)
    n = num_blocks(seq, block)
    mass = torch.zeros(heads, n, n)
    for first in range(0, n, chunk_blocks):
        q0, q1 = first * block, min((first + chunk_blocks) * block, seq)
        scores = (query[0, :, q0:q1] @ key[0, :, :q1].transpose(-1, -2)).float() * scale  # [H, q, k<=q1]
        causal = torch.arange(q1)[None, :] > torch.arange(q0, q1)[:, None]
        probs = scores.masked_fill_(causal, float("-inf")).softmax(-1)
        k_blocks = num_blocks(q1, block)
        probs = nn.functional.pad(probs, (0, k_blocks * block - q1, 0, (q1 - q0) % block and block - (q1 - q0) % block))
        rows = probs.shape[1] // block
        pooled = probs.view(heads, rows, block, k_blocks, block).sum((2, 4))
        real = torch.full((rows,), float(block))
        real[-1] = (q1 - q0) - (rows - 1) * block
        mass[:, first:first + rows, :k_blocks] = pooled / real[None, :, None]
    return mass


def coverage(mass: Tensor, keep: Tensor) -> Tensor:
    """[H]: the share of attention mass the layout keeps, mean over query blocks."""
    kept = clip_causal(keep[0] if keep.dim() == 4 else keep).float()
    return (mass * kept).sum(-1).mean(-1)


def score_layer(query: Tensor, key: Tensor, scale: float, block: int, candidates: list[dict[str, Any]]) -> HeadScores:
    """Coverage and density of every candidate at one layer, from its recorded queries and keys."""
    heads = query.shape[1]
    full_key = key.repeat_interleave(heads // key.shape[1], 1) if key.shape[1] != heads else key
    mass = block_mass(query, key, block, scale)
    covs, dens = [], []
    for spec in candidates:
        keep = make_pattern(spec).block_mask(query, full_key, block).expand(1, heads, *mass.shape[-2:])
        covs.append(coverage(mass, keep))
        dens.append(density(clip_causal(keep)))
    return HeadScores(list(candidates), torch.stack(covs), torch.stack(dens))


def choose(scores: HeadScores, target: float) -> tuple[list[dict[str, Any]], list[float], list[float]]:
    """Per head, the lowest-density candidate with coverage >= target (else dense): (specs, coverage, density)."""
    specs, covs, dens = [], [], []
    for head in range(scores.coverage.shape[1]):
        ok = (scores.coverage[:, head] >= target).nonzero().flatten().tolist()
        if not ok:
            specs.append(dict(DENSE)), covs.append(1.0), dens.append(1.0)
            continue
        best = min(ok, key=lambda c: float(scores.density[c, head]))
        specs.append(dict(scores.candidates[best]))
        covs.append(float(scores.coverage[best, head]))
        dens.append(float(scores.density[best, head]))
    return specs, covs, dens
