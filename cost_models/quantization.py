"""Cost of a linear layer under each weight scheme, and the row count where W8A8 starts to pay.

Decode (few rows) is bandwidth-bound: time ~ weight bytes / (bandwidth x the kernel's GEMV efficiency).
Prefill (many rows) is compute-bound: time ~ FLOPs / the scheme's GEMM rate. Weight-only kernels compute
in bf16 at a poor rate, so for many rows W8A8 (`torch._int_mm`) or dequantize-then-bf16 wins.
"""

from __future__ import annotations

import sympy as sp

from optpass.cost_models.formulas import evaluate, linear_time, scheme_key, weight_bytes_value
from optpass.cost_models.hardware import HardwareSpec
from optpass.sites import LinearSite

SCHEMES = ("fp32", "int8", "int4")


def weight_bytes(site: LinearSite, scheme: str, group_size: int = 32) -> float:
    """Bytes a forward reads for this layer's weights, scales and zero points."""
    return weight_bytes_value(scheme_key(scheme, group_size), site.out_features, site.in_features)


def linear_seconds(site: LinearSite, scheme: str, rows: int, spec: HardwareSpec, group_size: int = 32,
                   w8a8_min_rows: int | None = None) -> float:
    """Time of one linear at `rows` rows under `scheme` on `spec` (the sympy formula of cost_models/formulas.py;
    W8A8 above its row threshold is an int8-GEMM roofline, not calibrated)."""
    n, k = site.out_features, site.in_features
    if scheme == "int8" and w8a8_min_rows is not None and rows >= w8a8_min_rows and "int8" in spec.peak_flops:
        flops = 2.0 * rows * n * k
        compute = flops / (spec.peak_flops["int8"] * spec.efficiency.get("matmul", 0.7))
        memory = weight_bytes(site, "int8") / (spec.mem_bandwidth * spec.efficiency.get("memory", 0.8))
        return max(compute, memory) + spec.launch_floor
    return evaluate(linear_time(spec, scheme_key(scheme, group_size), n, k, sp.Integer(rows)))


def w8a8_crossover(site: LinearSite, spec: HardwareSpec, limit: int = 4096) -> int | None:
    """Smallest row count at which W8A8 beats weight-only int8 for this layer (None: never below `limit`)."""
    if "int8" not in spec.peak_flops or spec.kind != "cpu":
        return None
    rows = 1
    while rows <= limit:
        if linear_seconds(site, "int8", rows, spec, w8a8_min_rows=rows) < linear_seconds(site, "int8", rows, spec):
            return rows
        rows *= 2
    return None
