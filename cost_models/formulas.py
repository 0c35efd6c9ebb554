"""Per-op cost formulas as sympy expressions in batch `B`, query length `S`, context length `S_ctx` and
denoising steps `T`, so a cost is a function of shape (plotted, solved for a crossover) rather than a number.

Every op is a roofline: t = Max(flops / (peak[dtype] * eff), bytes / (bw * eff), launch), except that on a CPU
target (`spec.launch_additive`) the eager dispatch is paid in series: t = launch + Max(compute, memory).
Calibrated linear layers (`spec.linear`, cost_models/calibrate.py) use the measured per-call overhead, the
measured FLOP/s of the row regime (Piecewise in M = B*S) and the measured weight-streaming bandwidth.
Other passes' cost hooks (KV cache, DiT cache, sparse attention, layer skipping) build on the functions here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import sympy as sp

from optpass.cost_models.hardware import HardwareSpec

B, S, S_ctx, T = sp.symbols("B S S_ctx T", positive=True)
SYMBOLS = {"B": B, "S": S, "S_ctx": S_ctx, "T": T}
Expr = sp.Expr

_ELEM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}


def scheme_key(scheme: str, group_size: int | None = None) -> str:
    """`("int4", 64)` -> `"int4_g64"`, `("int8", 32)` -> `"int8_g32"` (group scales), `("int8", None)` -> `"int8"`
    (per channel): the keys calibrations use; other schemes are unchanged."""
    if scheme == "int4":
        return f"int4_g{group_size or 32}"
    return f"int8_g{group_size}" if scheme == "int8" and group_size else scheme


def weight_bytes_value(scheme: str, n: int, k: int) -> float:
    """Bytes a forward streams for an [n, k] weight: values at their stored precision plus scales / zeros."""
    if scheme.startswith("int4"):
        group = int(scheme.split("_g")[1]) if "_g" in scheme else 32
        return n * k / 2 + 2 * 4 * n * (k // group)  # packed nibbles + fp32 scale and zero per group
    if scheme == "int8":
        return n * k + 4 * n  # int8 values + one fp32 scale per output channel
    if scheme.startswith("int8_g"):
        return n * k + 4 * n * (k // int(scheme.split("_g")[1]))  # int8 values + an fp32 scale per group
    return _ELEM_BYTES.get(scheme, 4) * n * k


def roofline(flops: Expr | float, bytes_moved: Expr | float, peak: float, eff_compute: float, bandwidth: float,
             eff_memory: float, launch: float, additive: bool) -> Expr:
    """t = Max(flops / (peak * eff), bytes / (bw * eff), launch); CPU eager: launch + Max(compute, memory)."""
    # evaluate=False: sympy's Max simplification is ~30 ms a call; the numbers come from lambdify anyway
    core = sp.Max(sp.sympify(flops) / (peak * eff_compute), sp.sympify(bytes_moved) / (bandwidth * eff_memory),
                  evaluate=False)
    return launch + core if additive else sp.Max(core, launch, evaluate=False)


def _compute_seconds(rates: dict[int, float], n: int, k: int, rows: Expr) -> Expr:
    """Kernel seconds for `rows` rows from the measured regimes: linear in M between two measured row counts
    (a kernel switch or more reuse changes the slope, never the value at a measured point), FLOPs / the last
    regime's rate above it. Rates are FLOP/s, so they transfer across (n, k) through the FLOP count."""
    ms = sorted(rates)
    at = {m: 2.0 * m * n * k / rates[m] for m in ms}
    pieces = [(at[a] + (rows - a) * (at[b] - at[a]) / (b - a), sp.Lt(rows, b)) for a, b in zip(ms, ms[1:])]
    return sp.Piecewise(*pieces, (2 * rows * n * k / rates[ms[-1]], True))


def _calibrated(spec: HardwareSpec, key: str, n: int, k: int) -> dict | None:
    """The measured regimes for `key` at an [n, k] weight: the block-sized layer's, or the vocabulary-sized
    one's when the weight is nearer that size (geometric midpoint of the two measured sizes)."""
    cal = spec.linear.get(key)
    if cal is None and key.startswith("int4"):  # a quick calibration measures one group size: same kernel
        cal = next((v for name, v in spec.linear.items() if name.startswith("int4")), None)
    if cal is None and key.startswith("int8_g") and "int8" in spec.linear:
        # the same GEMV kernel plus one scale multiply per 16 inputs: per-channel rates, group-scale bytes
        cal = spec.linear["int8"]
    if cal is None or "large" not in cal or not cal.get("numel"):
        return cal
    if n * k >= math.sqrt(cal["numel"] * cal["large"]["numel"]):
        large = cal["large"]
        # above its measured row counts a GEMM is compute-bound: the block-sized layer's rates carry over
        rates = {m: r for m, r in cal["rates"].items() if m > max(large["rates"])} | large["rates"]
        return {**cal, **large, "rates": rates}
    return cal


def matmul_flops(n: int, k: int, rows: Expr) -> Expr:
    return 2 * rows * n * k


def linear_time(spec: HardwareSpec, scheme: str, n: int, k: int, rows: Expr = B * S) -> Expr:
    """One linear layer y[rows, n] = x[rows, k] @ W[n, k].T with W stored as `scheme` (a `scheme_key`)."""
    flops, wbytes = matmul_flops(n, k, rows), weight_bytes_value(scheme, n, k)
    act_bytes = 4 * rows * (n + k)
    cal = _calibrated(spec, scheme, n, k)
    if cal is not None:
        compute = _compute_seconds(cal["rates"], n, k, rows)
        return cal["overhead"] + sp.Max(compute, (wbytes + act_bytes) / cal["bw"], evaluate=False)
    eff = spec.efficiency
    base = scheme.split("_g")[0]
    mem_eff = eff.get(f"gemv_{base}", eff.get("memory", 0.8))
    if base in ("fp32", "bf16", "fp16"):
        rate: Expr = sp.Float(spec.flops(base))
    elif spec.kind == "cpu":  # weight-only kernels: own rate for few rows, dequantize + bf16 GEMM above 16
        wo = spec.peak_flops.get(f"{base}_wo", spec.flops("bf16"))
        rate = sp.Piecewise((wo, sp.Lt(rows, 16)), (spec.flops("bf16"), True))
    else:  # GPU weight-only kernels dequantize in registers and run on the bf16 tensor cores
        rate = sp.Float(spec.flops("bf16"))
    return roofline(flops, wbytes + act_bytes, rate, eff.get("matmul", 0.7), spec.mem_bandwidth, mem_eff,
                    spec.launch_floor, spec.launch_additive)


def op_parts(spec: HardwareSpec, kind: str, **shape: float) -> dict[str, float]:
    """Numeric compute / memory seconds of one op at a concrete shape, to say which bound it is.
    kind "linear": scheme, n, k, rows; kind "attention": heads, kv_heads, dim, q_len, ctx, causal."""
    if kind == "linear":
        scheme, n, k, rows = shape["scheme"], int(shape["n"]), int(shape["k"]), int(shape["rows"])
        flops, bytes_moved = 2.0 * rows * n * k, weight_bytes_value(scheme, n, k) + 4.0 * rows * (n + k)
        cal = _calibrated(spec, scheme, n, k)
        if cal is not None:
            # which bound: FLOPs at the kernel's best measured rate vs bytes at its streaming bandwidth
            return {"compute": flops / max(cal["rates"].values()), "memory": bytes_moved / cal["bw"],
                    "flops": flops, "bytes": bytes_moved}
        return {"compute": flops / (spec.flops("bf16" if "int" in scheme else scheme.split("_")[0])
                                    * spec.efficiency.get("matmul", 0.7)),
                "memory": bytes_moved / (spec.mem_bandwidth * spec.efficiency.get("memory", 0.8)),
                "flops": flops, "bytes": bytes_moved}
    q, ctx, h, kv, d = shape["q_len"], shape["ctx"], shape["heads"], shape["kv_heads"], shape["dim"]
    flops = float(attention_flops(1, int(h), sp.Integer(int(q)), sp.Integer(int(ctx)), int(d), bool(shape["causal"])))
    bytes_moved = d * 4 * (2 * h * q + 2 * kv * ctx)
    return {"compute": flops / (spec.flops("fp32") * spec.efficiency.get("attention", 0.5)),
            "memory": bytes_moved / (spec.mem_bandwidth * spec.efficiency.get("memory", 0.8)),
            "flops": flops, "bytes": bytes_moved}


# FlexAttention (Inductor CPU template) over a dense causal layout ran at 0.51-0.60x the speed of fused SDPA on a
# 2-core AVX-512 EPYC at 4k-8k tokens (benchmarks/sparse_attention.py measures the ratio in every run)
FLEX_TO_SDPA = 0.55


def attention_flops(batch: Expr, heads: int, q_len: Expr, ctx: Expr, dim: int, causal: bool) -> Expr:
    """QK^T and PV: 4*B*H*D per (query, key) pair; causal with past keys: S*S_ctx - S*(S-1)/2 pairs."""
    pairs = q_len * ctx - (q_len * (q_len - 1) / 2 if causal else 0)
    return 4 * batch * heads * dim * pairs


def sdpa_time(spec: HardwareSpec, heads: int, kv_heads: int, dim: int, causal: bool = True, batch: Expr = B,
              q_len: Expr = S, ctx: Expr = S_ctx, elem_bytes: int = 4) -> Expr:
    """Fused SDPA: reads q, k, v (k/v at kv-head count), writes out."""
    flops = attention_flops(batch, heads, q_len, ctx, dim, causal)
    bytes_moved = batch * dim * elem_bytes * (2 * heads * q_len + 2 * kv_heads * ctx)
    return roofline(flops, bytes_moved, spec.flops("fp32"), _attention_efficiency(spec, q_len), spec.mem_bandwidth,
                    spec.efficiency.get("memory", 0.8), spec.launch_floor + spec.attention_floor, spec.launch_additive)


def _attention_efficiency(spec: HardwareSpec, q_len: Expr) -> Expr | float:
    """SDPA's share of the fp32 peak: on a calibrated CPU the rate measured at each calibrated length, linear in
    between and held past the ends (PyTorch's kernel runs ~35 GFLOP/s at 128 tokens and ~115 at 2048 on the
    2-core Zen 4 VM: one median would over-predict long prefills by ~20%); else the spec's single figure."""
    rates = spec.attention_rates
    if not rates:
        return spec.efficiency.get("attention", 0.5)
    peak, lengths = spec.flops("fp32"), sorted(rates)
    pieces = [(sp.Float(rates[lengths[0]] / peak), sp.Lt(q_len, lengths[0]))]
    for a, b in zip(lengths, lengths[1:]):
        slope = (rates[b] - rates[a]) / (b - a) / peak
        pieces.append((rates[a] / peak + (q_len - a) * slope, sp.Lt(q_len, b)))
    return sp.Piecewise(*pieces, (sp.Float(rates[lengths[-1]] / peak), True))


def kv_read_bytes(layers: int, kv_heads: int, dim: int, elem_bytes: float, keep_ratio: Expr | float = 1,
                  batch: Expr = B, ctx: Expr = S_ctx) -> Expr:
    """Bytes of K and V a decode step reads: 2*L*B*Hkv*keep_ratio*S_ctx*D*bytes."""
    return 2 * layers * batch * kv_heads * keep_ratio * ctx * dim * elem_bytes


def memory_time(spec: HardwareSpec, bytes_moved: Expr | float, ops: int = 1) -> Expr:
    """A bandwidth-bound transfer (KV read, cache store / reload) split over `ops` dispatched ops."""
    return roofline(0, bytes_moved, 1.0, 1.0, spec.mem_bandwidth, spec.efficiency.get("memory", 0.8),
                    ops * spec.launch_floor, spec.launch_additive)


def sparse_attention_time(spec: HardwareSpec, heads: int, kv_heads: int, dim: int, rho: Expr | float,
                          block: int = 64, causal: bool = True, index_bytes: int = 4, batch: Expr = B,
                          q_len: Expr = S, ctx: Expr = S_ctx, elem_bytes: int = 4) -> Expr:
    """Block-sparse attention at density `rho`: rho of the FLOPs and K/V bytes, plus the block-index bytes, at the
    `sparse_attention` efficiency: calibrated on CPU (the lowering this machine runs: optpass's bf16 kernel where
    AVX-512 BF16 exists, ~2x fp32 SDPA, else FlexAttention); default FLEX_TO_SDPA of dense attention's."""
    flops = rho * attention_flops(batch, heads, q_len, ctx, dim, causal)
    index = batch * heads * sp.ceiling(q_len / block) * sp.ceiling(ctx / block) * rho * index_bytes
    bytes_moved = batch * dim * elem_bytes * (2 * heads * q_len + 2 * kv_heads * ctx * rho) + index
    eff = spec.efficiency.get("sparse_attention", FLEX_TO_SDPA * spec.efficiency.get("attention", 0.5))
    return roofline(flops, bytes_moved, spec.flops("fp32"), eff, spec.mem_bandwidth,
                    spec.efficiency.get("memory", 0.8), spec.launch_floor + spec.attention_floor, spec.launch_additive)


def prefill_kernel_time(spec: HardwareSpec, heads: int, kv_heads: int, dim: int, batch: Expr = B, q_len: Expr = S,
                        ctx: Expr = S_ctx) -> Expr:
    """Attention of a layer whose long prefills run optpass's bf16 kernel: the kernel (a dense causal layout of the
    block-sparse lowering, as the calibration times it, plus its per-call floor) from `prefill_attention.MIN_ROWS`
    new tokens (`prefill_attention.route`), fused SDPA below (decode and verify steps keep their own kernel)."""
    from optpass.backends.cpu.prefill_attention import MIN_ROWS

    kernel = sparse_attention_time(spec, heads, kv_heads, dim, 1.0, causal=True, batch=batch, q_len=q_len, ctx=ctx) \
        + (spec.sparse_call_floor or 0.0)
    sdpa = sdpa_time(spec, heads, kv_heads, dim, True, batch, q_len, ctx)
    return sp.Piecewise((kernel, q_len > MIN_ROWS - 1), (sdpa, True))


def linear_attention_time(spec: HardwareSpec, heads: int, dim: int, batch: Expr = B, q_len: Expr = S,
                          elem_bytes: int = 4) -> Expr:
    """Kernelised (linear) attention: ~4*B*H*S*D^2 FLOPs, linear in S."""
    flops = 4 * batch * heads * q_len * dim ** 2
    bytes_moved = 4 * batch * heads * q_len * dim * elem_bytes
    return roofline(flops, bytes_moved, spec.flops("fp32"), spec.efficiency.get("matmul", 0.7), spec.mem_bandwidth,
                    spec.efficiency.get("memory", 0.8), spec.launch_floor, spec.launch_additive)


def elementwise_time(spec: HardwareSpec, numel: Expr | float, elem_bytes: int = 4, tensors: int = 2) -> Expr:
    """Norms, activations, residual adds: no reuse, so only the boundary bytes (`tensors` reads + writes)."""
    return roofline(0, numel * elem_bytes * tensors, 1.0, 1.0, spec.mem_bandwidth,
                    spec.efficiency.get("elementwise", 0.6), spec.launch_floor, spec.launch_additive)


def skipped_blocks_time(forward: Expr, block_time: Expr, skipped: int) -> Expr:
    """A forward with `skipped` of its blocks bypassed (their cost removed)."""
    return forward - skipped * block_time


def cached_steps_time(spec: HardwareSpec, step_time: Expr, cached_fraction: Expr | float, cache_bytes: Expr | float,
                      steps: Expr = T) -> Expr:
    """DiT sampling over `steps` where a fraction of steps reuse cached block outputs: the computed steps
    pay their cost plus storing the cache, the cached ones only reload it."""
    store = memory_time(spec, cache_bytes)
    return steps * ((1 - cached_fraction) * (step_time + store) + cached_fraction * store)


def peak_memory(weights: Expr | float, kv_cache: Expr | float, activations: Expr | float) -> Expr:
    """Peak bytes: weights + KV cache + the live activations."""
    return sp.sympify(weights) + kv_cache + activations


def crossover(delta: Expr, symbol: sp.Symbol = S, subs: dict | None = None, lo: float = 1,
              hi: float = 65536) -> float | None:
    """Where `delta` (after - before) changes sign in [lo, hi]: solved exactly when the expression is smooth,
    else located on a geometric grid and refined by bisection. None when the sign never changes."""
    expr = sp.sympify(delta).subs(subs or {})
    if not expr.has(sp.Max, sp.Min, sp.Piecewise, sp.ceiling):
        roots = [r for r in sp.solve(sp.Eq(expr, 0), symbol) if r.is_real and lo <= float(r) <= hi]
        return float(min(roots)) if roots else None
    return sign_change(sp.lambdify(symbol, expr, "math"), lo, hi)


def sign_change(f: Callable[[float], float], lo: float = 1, hi: float = 65536) -> float | None:
    """First x in [lo, hi] where f changes between paying (f < 0) and not: a geometric grid, then bisection."""
    grid = sorted({lo, hi, *(lo * 2 ** i for i in range(int(math.log2(hi / lo)) + 1))})
    pays = [f(x) < 0 for x in grid]  # a zero difference is not a gain
    for a, b, pa, pb in zip(grid, grid[1:], pays, pays[1:]):
        if pa != pb:
            for _ in range(40):
                mid = (a + b) / 2
                a, b = (mid, b) if (f(mid) < 0) == pa else (a, mid)
            return float(b)
    return None


def evaluate(expr: Expr, **values: float) -> float:
    """Numeric value of `expr` at e.g. B=1, S=128, S_ctx=128."""
    expr = sp.sympify(expr)
    syms = [SYMBOLS[k] for k in values]
    return float(sp.lambdify(syms, expr, "math")(*values.values())) if syms else float(expr)


def total(exprs: Iterable[Expr]) -> Expr:
    return sp.Add(*exprs)
