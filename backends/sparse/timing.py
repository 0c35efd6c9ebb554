"""Where a layer's layout actually beats dense SDPA on this machine: its sparse and dense attention timed on the
calibration queries and keys, cut to a few prefill lengths, interleaved, median of `repeats`. The cost model's
crossover is a prediction; this is the measurement the pass checks it against (and takes when it is later)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor

from optpass.backends.sparse.execute import block_sparse_attention
from optpass.backends.sparse.plan import LayerSparsity


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def dense_vs_sparse(plan: LayerSparsity, query: Tensor, key: Tensor, scale: float, seq: int,
                    repeats: int = 3) -> tuple[float, float]:
    """(dense SDPA, sparse) median seconds of this layer's attention over the first `seq` positions."""
    q, k = query[:, :, :seq], key[:, :, :seq]

    def dense() -> None:
        F.scaled_dot_product_attention(q, k, k, scale=scale, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])

    def sparse() -> None:
        block_sparse_attention(q, k, k, plan.block_mask(q, k), plan.block, scale)

    sparse()  # compiled once per process; the first call of a new shape pays guards
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for r in range(repeats):
        for name, fn in ((("dense", dense), ("sparse", sparse)) if r % 2 == 0 else (("sparse", sparse), ("dense", dense))):
            times[name].append(_seconds(fn))
    return sorted(times["dense"])[repeats // 2], sorted(times["sparse"])[repeats // 2]


def measured_crossover(plan: LayerSparsity, query: Tensor, key: Tensor, scale: float, lengths: list[int],
                       band: float) -> tuple[int, dict[int, float]]:
    """(shortest tested length from which every longer tested length pays by more than `band`, else twice the
    longest tested, {length: measured speedup})."""
    speedups = {}
    for seq in sorted(lengths):
        dense, sparse = dense_vs_sparse(plan, query, key, scale, seq)
        speedups[seq] = dense / sparse
    cross = 2 * max(lengths)
    for seq in sorted(lengths, reverse=True):
        if speedups[seq] * (1 - band) <= 1.0:
            break
        cross = seq
    return cross, speedups
