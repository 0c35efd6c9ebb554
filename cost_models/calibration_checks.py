"""Whether a calibration can be trusted: a busy-machine probe before each measurement, and sanity bounds on the
figures a calibration produced.

A calibration taken while another job holds a core does not fail, it measures nonsense (an int8 per-call
overhead of 11.7 ms, weight streaming at 0.0-0.7 GB/s, spreads of +-155%), and every later plan follows it.
So: before each step the calibration checks the cores are free (`busy`: a parallel GEMM must run nearly
`threads` times faster than on one thread; a busy core holds the parallel op back to the pace of its slowest
thread) and backs off when they are not; after it, `problems` checks physical bounds (no weight-streaming rate
above the fused triad measured in the same run, none far below it, per-call overheads in the microseconds,
spreads bounded). A record with problems is not cached, and a cached record that has them is ignored.
"""

from __future__ import annotations

import time
from typing import Any

import torch

MIN_PARALLEL_EFFICIENCY = 0.7  # a quiet machine measures ~0.9-1.0 here; one core busy ~0.5
STREAM_ABOVE_TRIAD = 1.5  # weights streamed faster than this x the triad: cache effects or a broken clock
STREAM_BELOW_TRIAD = 1 / 25  # a kernel streaming 25x slower than a plain fused copy was interrupted
MAX_OVERHEAD_S = 1e-3  # a linear layer's per-call overhead (tens of us on a quiet machine)
MAX_SPREAD = 1.0  # (max - min) / median of a measurement after its retries
BACKOFF_S = (2.0, 5.0, 10.0)  # waits before re-probing a busy machine


def parallel_efficiency(threads: int | None = None, reps: int = 5) -> float:
    """Speedup of a cache-resident GEMM on `threads` threads over one thread, divided by `threads` (1.0 when
    every core is free)."""
    threads = threads or torch.get_num_threads()
    if threads < 2:
        return 1.0
    a = torch.randn(384, 384)

    def best(n: int) -> float:
        torch.set_num_threads(n)
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(8):
                torch.mm(a, a)
            samples.append(time.perf_counter() - t0)
        return min(samples)

    try:
        one, many = best(1), best(threads)
    finally:
        torch.set_num_threads(threads)
    return one / many / threads


def busy(threads: int | None = None) -> str | None:
    """Why the machine is too busy to calibrate on, or None."""
    threads = threads or torch.get_num_threads()
    efficiency = parallel_efficiency(threads)
    if efficiency < MIN_PARALLEL_EFFICIENCY:
        return (f"the machine is busy: a GEMM on {threads} threads gave a {efficiency * threads:.2f}x speedup over "
                f"one thread (a quiet machine: ~{threads * 0.95:.1f}x); another job holds a core")
    return None


def wait_until_quiet(threads: int | None = None, backoff: tuple[float, ...] = BACKOFF_S) -> str | None:
    """Probe, and while the machine is busy wait and re-probe (`backoff` seconds); the last reason, or None."""
    reason = busy(threads)
    for pause in backoff:
        if reason is None:
            return None
        time.sleep(pause)
        reason = busy(threads)
    return reason


def problems(record: dict[str, Any]) -> list[str]:
    """What makes a calibration record implausible (empty: it may be cached and used)."""
    out: list[str] = []
    missing = [k for k in ("triad", "linear", "floors", "sdpa") if k not in record]
    if missing:
        return [f"the record is incomplete (no {', '.join(missing)})"]
    try:
        triad = float(record["triad"]["bytes_per_s"])
        spreads = {"triad": record["triad"]["spread"]}
        linear = record["linear"]
    except (KeyError, TypeError, ValueError) as exc:
        return [f"the record is incomplete ({type(exc).__name__}: {exc})"]
    if not triad > 0:
        return [f"triad bandwidth {triad} is not positive"]
    # a quick record (tests) measures cache-resident shapes, the triad included (4 MiB arrays: ~150 GB/s on a
    # large-L3 host), against overhead-bound tiny kernels: neither streaming bound means anything there
    streaming = not record.get("quick")
    for scheme, v in linear.items():
        bw, overhead = float(v.get("bw", 0.0)), float(v.get("overhead", 0.0))
        if streaming and bw > STREAM_ABOVE_TRIAD * triad:
            out.append(f"{scheme} streams weights at {bw / 1e9:.1f} GB/s, above {STREAM_ABOVE_TRIAD}x the "
                       f"{triad / 1e9:.1f} GB/s triad of the same run")
        if streaming and bw < STREAM_BELOW_TRIAD * triad:
            out.append(f"{scheme} streams weights at {bw / 1e9:.2f} GB/s, {triad / max(bw, 1.0):.0f}x slower than the "
                       f"{triad / 1e9:.1f} GB/s triad of the same run")
        if not 0 <= overhead <= MAX_OVERHEAD_S:
            out.append(f"{scheme} per-call overhead {overhead * 1e6:,.0f} us (a quiet machine: tens of us)")
        spreads.update({f"{scheme} M={m}": s for m, s in v.get("spread", {}).items()})
    wide = {k: s for k, s in spreads.items() if s > MAX_SPREAD}
    if wide:
        worst = max(wide, key=wide.get)
        out.append(f"{len(wide)} measurement(s) spread more than +-{MAX_SPREAD / 2:.0%} after retries (worst: {worst} "
                   f"+-{wide[worst] / 2:.0%})")
    return out
