"""Cost of a linear layer under each weight scheme, and the row count where W8A8 starts to pay.

Decode (few rows) is bandwidth-bound: time ~ weight bytes / (bandwidth x the kernel's GEMV efficiency).
Prefill (many rows) is compute-bound: time ~ FLOPs / the scheme's GEMM rate. Weight-only kernels compute
in bf16 at a poor rate, so for many rows W8A8 (`torch._int_mm`) or dequantize-then-bf16 wins.
"""

from __future__ import annotations

from optpass.cost_models.hardware import HardwareSpec
from optpass.sites import LinearSite

SCHEMES = ("fp32", "int8", "int4")


def weight_bytes(site: LinearSite, scheme: str, group_size: int = 32) -> float:
    """Bytes a forward reads for this layer's weights, scales and zero points."""
    n, k = site.out_features, site.in_features
    if scheme == "int8":
        return n * k + 4 * n
    if scheme == "int4":
        return n * k / 2 + 8 * n * (k // group_size)
    return 4.0 * n * k


def linear_seconds(site: LinearSite, scheme: str, rows: int, spec: HardwareSpec, group_size: int = 32,
                   w8a8_min_rows: int | None = None) -> float:
    """Roofline time of one linear at `rows` rows under `scheme` on `spec`."""
    flops = 2.0 * rows * site.in_features * site.out_features
    eff = spec.efficiency
    memory = weight_bytes(site, scheme, group_size) / (spec.mem_bandwidth * eff.get(f"gemv_{scheme}", eff.get("memory", 0.8)))
    if scheme == "fp32":
        rate = spec.peak_flops.get("fp32")
    elif scheme == "int8" and w8a8_min_rows is not None and rows >= w8a8_min_rows:
        rate = spec.peak_flops.get("int8")
    elif scheme in ("int4", "int8") and rows >= 16:
        rate = spec.peak_flops.get("bf16")  # dequantized to bf16 for a compute-bound GEMM
    else:
        rate = spec.peak_flops.get(f"{scheme}_wo", spec.peak_flops.get("bf16"))
    compute = flops / (rate * eff.get("matmul", 0.7)) if rate else 0.0
    return max(memory, compute, spec.launch_floor)


def w8a8_crossover(site: LinearSite, spec: HardwareSpec, limit: int = 4096) -> int | None:
    """Smallest row count at which W8A8 beats weight-only int8 for this layer (None: never below `limit`)."""
    if "int8" not in spec.peak_flops or "int8_wo" not in spec.peak_flops:
        return None
    rows = 1
    while rows <= limit:
        if linear_seconds(site, "int8", rows, spec, w8a8_min_rows=rows) < linear_seconds(site, "int8", rows, spec):
            return rows
        rows *= 2
    return None
