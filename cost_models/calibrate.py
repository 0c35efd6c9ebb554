"""Calibrate the `cpu` target on this machine: measure what the roofline needs instead of trusting a datasheet.

Measures (median of several repetitions, with the spread; a measurement whose spread is large is re-taken):
- bandwidth: the fused triad `torch.add(b, c, alpha=q, out=a)` on arrays well above the last-level cache;
- linear layers per weight scheme (fp32, bf16, int8 / int4 weight-only as optpass's own `Int8Linear` /
  `Int4Linear` run them) at M in {1, 16, 128, 1024} rows, each kernel measured, never scaled from another dtype;
  the per-call overhead (a tiny layer) is separated from the throughput (a stack of layers larger than the cache);
- causal SDPA FLOP/s vs sequence length; per-call floors: a typical small eager op (the glue between a
  block's linears), an nn.Module call and a decode-sized SDPA call;
- linear regimes twice: on a block-sized layer (576 x 1536) and a vocabulary-sized one (32768 x 768).
The result is cached as JSON keyed by a fingerprint (torch version, thread count, ISA flags, CPU model), so a
different torch, thread count or machine never reuses it. A calibration on a busy machine, or one whose figures
are implausible, is refused and not cached; a cached one that fails the same checks (hand-edited, corrupted,
from an older optpass) is ignored, and the spec says why (`cost_models/calibration_checks.py`).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optpass.cost_models.calibration_checks import BACKOFF_S, parallel_efficiency, problems, wait_until_quiet
from optpass.cost_models.hardware import HardwareSpec, uncalibrated_cpu

FORMAT = 2
ROWS = (1, 16, 128, 1024)
# a vocabulary-sized projection, far above the cache: GEMM rates there differ from a block-sized layer's (fp32
# at 16 rows runs at half the block layer's FLOP/s here), so layers near this size use its own regimes
LARGE_SHAPE = (32768, 768)
LARGE_ROWS = (1, 16, 128)
SCHEMES = ("fp32", "bf16", "int8", "int8_g32", "int4_g32", "int4_g64", "int4_g128")
SPREAD_LIMIT = 0.25  # (max - min) / median above which a measurement is re-taken
_ISA = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
        "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile", "asimd", "sve")
_LOADED: dict[str, HardwareSpec | None] = {}


def fingerprint() -> dict[str, Any]:
    """What a calibration depends on: torch version, thread count, ISA flags, CPU model, optpass's kernels."""
    flags: set[str] = set()
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": model,
            "capability": torch.backends.cpu.get_cpu_capability(), "isa": sorted(flags & set(_ISA)),
            "kernels": _kernel_sources_digest()}


@functools.cache  # the sources do not change within a process; fingerprint() runs on every spec lookup
def _kernel_sources_digest() -> str:
    """A digest of optpass's C++ kernel sources and of the quantized linears' per-row-count dispatch: a
    calibration timed other kernels once either changes."""
    from optpass.backends.cpu import quant_linear
    from optpass.backends.cpu.gemv_ops import _HEADERS, _SOURCES

    h = hashlib.sha256()
    for path in [*_SOURCES, *_HEADERS, quant_linear.__file__]:
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:12]


def cache_path(fp: dict[str, Any] | None = None) -> Path:
    """Where this fingerprint's record lives: `<OPTPASS_CACHE>/calibration`, or `OPTPASS_CALIBRATION_DIR` (the
    test suite points it at an empty directory per test, so a machine's own calibration cannot change which
    candidates rank first there)."""
    from optpass.models import cache_dir

    key = hashlib.sha256(json.dumps(fp or fingerprint(), sort_keys=True).encode()).hexdigest()[:16]
    root = os.environ.get("OPTPASS_CALIBRATION_DIR")
    return (Path(root) if root else cache_dir() / "calibration") / f"cpu-{key}.json"


def _time(fn: Callable[[], object], reps: int, inner: int = 1) -> dict[str, float]:
    """Median and relative spread of seconds per call; re-measured (twice at most) when the spread is large."""
    best: dict[str, float] = {}
    for attempt in range(3):
        fn()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) / inner)
        med = statistics.median(samples)
        result = {"median": med, "spread": (max(samples) - min(samples)) / med if med > 0 else 0.0,
                  "attempts": attempt + 1}
        if not best or result["spread"] < best["spread"]:
            best = result
        if result["spread"] <= SPREAD_LIMIT:
            break
    return best


def _triad(numel: int, reps: int) -> dict[str, float]:
    a, b, c = (torch.empty(numel) for _ in range(3))
    b.fill_(1.0), c.fill_(2.0)
    r = _time(lambda: torch.add(b, c, alpha=3.0, out=a), reps)
    return {**r, "bytes_per_s": 3 * 4 * numel / r["median"]}


def _layer(scheme: str, n: int, k: int) -> nn.Module:
    from optpass.backends.cpu.quant_linear import Int4Linear, Int8Linear

    lin = nn.Linear(k, n, bias=False)
    if scheme == "fp32":
        return lin
    if scheme == "bf16":
        return lin.to(torch.bfloat16)
    if scheme.startswith("int8"):
        return Int8Linear.from_linear(lin, group_size=int(scheme.split("_g")[1]) if "_g" in scheme else None)
    return Int4Linear.from_linear(lin, int(scheme.split("_g")[1]))


def _stack_time(scheme: str, n: int, k: int, rows: int, layers: int, reps: int) -> dict[str, float]:
    """Seconds per layer call over `layers` distinct layers (distinct weights: nothing stays in cache)."""
    mods = [_layer(scheme, n, k) for _ in range(layers)]
    x = torch.randn(rows, k, dtype=torch.bfloat16 if scheme == "bf16" else torch.float32)

    def run() -> None:
        for m in mods:
            m(x)

    with torch.inference_mode():
        r = _time(run, reps)
    return {**r, "median": r["median"] / layers}


def _regimes(scheme: str, cache_bytes: float, shape: tuple[int, int], rows_list: tuple[int, ...], reps: int,
             max_layers: int, overhead: float) -> dict[str, Any]:
    """FLOP/s per row regime (and the M=1 streaming bandwidth) of a cold `shape` stack, net of `overhead`."""
    from optpass.cost_models.formulas import weight_bytes_value

    n, k = shape
    wbytes = weight_bytes_value(scheme, n, k)
    out: dict[str, Any] = {"rates": {}, "spread": {}, "numel": n * k}
    for rows in rows_list:
        cold = math.ceil(3 * cache_bytes / wbytes) if rows <= 16 else 2
        r = _stack_time(scheme, n, k, rows, max(2, min(cold, max_layers)), reps)
        net = max(r["median"] - overhead, 0.1 * r["median"])  # overhead is itself a noisy estimate
        out["rates"][rows] = 2.0 * rows * n * k / net
        out["spread"][rows] = r["spread"]
        if rows == 1:
            out["bw"] = wbytes / net
    return out


def _linear(scheme: str, cache_bytes: float, shape: tuple[int, int], rows_list: tuple[int, ...], reps: int,
            quick: bool) -> dict[str, Any]:
    """Per-call overhead (tiny layer, M=1), then the regimes of `shape` and (full calibrations) of LARGE_SHAPE."""
    overhead = _stack_time(scheme, 64, 128, 1, 8, reps)["median"]  # a layer small enough to be all overhead
    out = {"overhead": overhead, **_regimes(scheme, cache_bytes, shape, rows_list, reps, 8 if quick else 400, overhead)}
    if not quick:
        out["large"] = _regimes(scheme, cache_bytes, LARGE_SHAPE, LARGE_ROWS, reps, 8, overhead)
    return out


def _causal_rates(seqs: tuple[int, ...], reps: int, kv_heads: int,
                  call: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object], heads: int = 9,
                  dim: int = 64) -> dict[int, dict[str, float]]:
    """Seconds and causal-attention FLOP/s of `call(q, k, v)` at each length (q [1, heads, S, dim], k / v with
    `kv_heads`)."""
    out = {}
    for s in seqs:
        q, k, v = torch.randn(1, heads, s, dim), torch.randn(1, kv_heads, s, dim), torch.randn(1, kv_heads, s, dim)
        r = _time(lambda: call(q, k, v), reps)
        out[s] = {**r, "flops_per_s": 4.0 * heads * dim * s * (s + 1) / 2 / r["median"]}
    return out


def _sdpa(seqs: tuple[int, ...], reps: int) -> dict[int, dict[str, float]]:
    return _causal_rates(seqs, reps, 9, lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True))


def _block_sparse(seqs: tuple[int, ...], reps: int, block: int = 64) -> dict[int, dict[str, float]]:
    """The block-sparse lowering this machine runs (`backends/sparse/execute.py`: optpass's bf16 kernel, or
    FlexAttention) on a dense causal layout, layout conversion included: its rate at long prefills and, from the
    shortest, its per-call cost, which the cost model's sparse-attention crossover needs."""
    from optpass.backends.sparse.execute import block_sparse_attention

    layouts: dict[int, torch.Tensor] = {}  # built once per length, outside the timed calls

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> object:
        n = -(-q.shape[2] // block)
        if n not in layouts:
            layouts[n] = torch.ones(1, 1, n, n, dtype=torch.bool)
        return block_sparse_attention(q, k, v, layouts[n], block, q.shape[-1] ** -0.5)
    return _causal_rates(seqs, reps, 3, call)


def _floors(reps: int) -> dict[str, dict[str, float]]:
    """Per-call costs that no FLOP or byte explains: a tiny aten op, an nn.Module call, and a decode-sized
    SDPA (one query over 64 keys: its setup, not its math, is what a decode step pays per layer)."""
    x, y, ident = torch.ones(8), torch.ones(8), nn.Identity()
    op = _time(lambda: torch.add(x, y), reps, inner=500)
    mod = _time(lambda: ident(x), reps, inner=500)
    q, kv = torch.randn(1, 9, 1, 64), torch.randn(1, 9, 64, 64)
    sdpa = _time(lambda: torch.nn.functional.scaled_dot_product_attention(q, kv, kv), reps, inner=50)
    h, w = torch.randn(1, 1, 576), torch.randn(576)
    glue = _time(lambda: _glue_chain(h, w), reps, inner=100)
    glue = {**glue, "median": glue["median"] / _GLUE_OPS}
    return {"op": op, "module": {**mod, "median": max(mod["median"], 0.0)}, "sdpa": sdpa, "glue": glue}


_GLUE_OPS = 15


def _glue_chain(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The glue between a transformer block's linears at decode size, 15 eager ops: an RMS norm (pow, mean,
    add, rsqrt, mul, mul), a head split (view, transpose), a rotary half-swap (slice, slice, neg, cat) and a
    blend (mul, mul, add). Its per-op time is the dispatch floor a captured graph's glue ops pay; one
    `torch.add` on 8 floats (the "op" floor) is the cheapest op, not a typical one."""
    y = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
    q = y.view(1, 1, 9, 64).transpose(1, 2)
    r = torch.cat((-q[..., 32:], q[..., :32]), dim=-1)
    return q * 0.5 + r * 0.5


def calibrate(quick: bool = False, progress: bool = True, check: bool = True,
              backoff: tuple[float, ...] = BACKOFF_S) -> dict[str, Any]:
    """Run every measurement; `quick` is a seconds-long version with small shapes for tests. With `check`,
    each step waits (`backoff`) for a busy machine to quiet down, and the finished record must pass the sanity
    bounds; otherwise `CalibrationError` says why and nothing is returned to cache."""
    from optpass.errors import CalibrationError
    from optpass.progress import track

    base = uncalibrated_cpu()
    reps = 3 if quick else 7
    shape = (256, 128) if quick else (576, 1536)  # (N, K) of SmolLM2 down_proj: K divides every int4 group
    rows_list = (1, 16) if quick else ROWS
    schemes = ("fp32", "int8", "int4_g32") if quick else SCHEMES
    steps = ["triad", "floors", "sdpa", "block_sparse", *schemes]
    record: dict[str, Any] = {"format": FORMAT, "fingerprint": fingerprint(), "quick": quick,
                              "shape": list(shape), "linear": {},
                              "taken_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "conditions": {"loadavg_before": list(os.getloadavg()), "parallel_efficiency": {}}}
    start = time.perf_counter()
    for step in track(steps, "calibrating cpu", total=len(steps)) if progress else steps:
        if check:
            reason = wait_until_quiet(backoff=backoff)
            if reason is not None:
                raise CalibrationError(f"calibration refused before its {step} step: {reason}; nothing was cached "
                                       "(re-run on a quiet machine)")
            record["conditions"]["parallel_efficiency"][step] = round(parallel_efficiency(), 3)
        if step == "triad":
            record["triad"] = _triad(1 << 20 if quick else max(1 << 25, int(8 * base.cache_bytes / 12)), reps)
        elif step == "floors":
            record["floors"] = _floors(reps)
        elif step == "sdpa":
            record["sdpa"] = _sdpa((64, 128) if quick else (128, 512, 1024, 2048), reps)
        elif step == "block_sparse":
            record["block_sparse"] = _block_sparse((64, 128) if quick else (128, 2048), reps)
        else:
            record["linear"][step] = _linear(step, base.cache_bytes, shape, rows_list, reps, quick)
    record["seconds"] = time.perf_counter() - start
    record["conditions"]["loadavg_after"] = list(os.getloadavg())
    bad = problems(record) if check else []
    if bad:
        raise CalibrationError("calibration refused, its figures are implausible: " + "; ".join(bad) +
                               "; nothing was cached (re-run on a quiet machine)")
    return record


def spec_from_record(record: dict[str, Any]) -> HardwareSpec:
    """A calibrated `HardwareSpec` from a calibration record (the measured figures replace the estimates)."""
    base = uncalibrated_cpu()
    def regime(v: dict[str, Any]) -> dict[str, Any]:
        return {"bw": v["bw"], "rates": {int(m): r for m, r in v["rates"].items()}, "numel": v.get("numel")}

    linear = {s: {"overhead": v["overhead"], **regime(v), **({"large": regime(v["large"])} if "large" in v else {})}
              for s, v in record["linear"].items()}
    peaks = dict(base.peak_flops)
    for scheme, key in (("fp32", "fp32"), ("bf16", "bf16"), ("int8", "int8_wo"), ("int4_g32", "int4_wo")):
        if scheme in linear:
            peaks[key] = max(linear[scheme]["rates"].values())
    bw = record["triad"]["bytes_per_s"]
    eff = dict(base.efficiency)
    for scheme, v in linear.items():
        eff[f"gemv_{scheme}"] = min(v["bw"] / bw, 1.0)
    attention = {int(s): v["flops_per_s"] for s, v in record["sdpa"].items()}
    eff["attention"] = statistics.median(attention.values()) / peaks["fp32"]
    sparse_floor = None
    if "block_sparse" in record:  # records of older calibrations lack it: the formula's defaults then
        timed = {int(s): v for s, v in record["block_sparse"].items()}
        longest, shortest = timed[max(timed)], timed[min(timed)]
        eff["sparse_attention"] = longest["flops_per_s"] / peaks["fp32"]
        shortest_flops = shortest["flops_per_s"] * shortest["median"]
        sparse_floor = max(shortest["median"] - shortest_flops / longest["flops_per_s"], 0.0)
    spreads = [record["triad"]["spread"]] + [sp for v in record["linear"].values() for sp in v["spread"].values()]
    # the band: half the median measurement range (noise), or the accuracy benchmark's measured error of
    # predicted speedups when one was recorded for this calibration (`record_validation`), whichever is larger
    band = min(max(0.05, statistics.median(spreads) / 2, record.get("validated_error", 0.0)), 0.25)
    floor = record["floors"]["glue"]["median"]
    fp = record["fingerprint"]
    note = (f"calibrated {'(quick) ' if record.get('quick') else ''}for torch {fp['torch']}, {fp['threads']} threads, "
            f"{fp['capability']}; triad {bw / 1e9:.1f} GB/s; median spread {statistics.median(spreads):.0%}")
    return dataclasses.replace(
        base, name="cpu", peak_flops=peaks, mem_bandwidth=bw, efficiency=eff, calibrated=True,
        launch_floor=floor, module_floor=record["floors"]["module"]["median"],
        attention_floor=max(record["floors"]["sdpa"]["median"] - floor, 0.0),
        linear=linear, attention_rates=attention, error_band=band, sparse_call_floor=sparse_floor,
        source={**base.source, "calibration": note, "mem_bandwidth": "fused triad, calibrated",
                "peak_flops": "best measured GEMM rate per dtype / kernel (calibrated)"})


def save(record: dict[str, Any], path: Path | None = None) -> Path:
    path = path or cache_path(record["fingerprint"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    _LOADED.clear()
    return path


def load(path: Path | None = None) -> dict[str, Any] | None:
    """The cached record for this machine's current fingerprint, or None (missing, stale, another format, or
    failing the sanity checks: `load_with_reason` says which)."""
    return load_with_reason(path)[0]


def load_with_reason(path: Path | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None), or (None, why a cached file was not used; None when there is no file)."""
    fp = fingerprint()
    path = path or cache_path(fp)
    if not path.exists():
        return None, None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return None, f"{path} is unreadable ({type(exc).__name__}: {exc})"
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        return None, f"{path} has another format (written by another optpass version)"
    if record.get("fingerprint") != fp:
        return None, f"{path} was taken with another torch, thread count, CPU or kernel build"
    bad = problems(record)
    if bad:
        return None, f"{path} is implausible: " + "; ".join(bad)
    return record, None


def record_validation(error: float, source: str) -> Path | None:
    """Store the accuracy benchmark's measured error of predicted speedups with the cached calibration, so the
    selection band reflects the model's validated error, not only the measurement noise."""
    record = load()
    if record is None:
        return None
    record["validated_error"], record["validated_by"] = float(error), source
    return save(record)


def calibrated_spec() -> HardwareSpec | None:
    """The calibrated `cpu` spec for the current fingerprint (memoised per cache file); the uncalibrated spec
    with the reason in `source["calibration"]` when a cached file was ignored; None when there is none."""
    path = cache_path()
    key = f"{path}:{path.stat().st_mtime_ns if path.exists() else 0}"
    if key not in _LOADED:
        record, why = load_with_reason(path)
        if record is not None:
            _LOADED[key] = spec_from_record(record)
        elif why is not None:
            base = uncalibrated_cpu()
            note = f"uncalibrated: the cached calibration was ignored, {why}; re-run `optpass calibrate --force`"
            _LOADED[key] = dataclasses.replace(base, source={**base.source, "calibration": note})
        else:
            _LOADED[key] = None
    return _LOADED[key]
