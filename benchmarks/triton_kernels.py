"""Time the Triton weight-only int8 / int4 linear kernels against fp16 cuBLAS (`F.linear`).

    python benchmarks/triton_kernels.py [--reps 50] [--iters 20] [--group-size 128]

K = N = 4096, M in {1, 16, 128}, fp16 activations.  Each repetition times a batch of `iters` calls of
every method back to back (interleaved, so clock/thermal drift hits all methods alike) with CUDA
events after a `torch.cuda.synchronize`; the reported time is the median over repetitions.  Prints a
markdown table and writes benchmarks/results/triton_kernels.json.  Without CUDA it prints
"no CUDA device: skipped" and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results" / "triton_kernels.json"
M_VALUES = (1, 16, 128)
K = N = 4096


def _time_batch(fn: Callable[[], torch.Tensor], iters: int) -> float:
    """Microseconds per call, averaged over one batch of `iters` calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def bench(reps: int, iters: int, group_size: int) -> dict:
    import triton

    from optpass.backends import quant_format as qf
    from optpass.backends.triton import ops

    dev = torch.device("cuda")
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.02
    q8, s8 = qf.quantize_int8(w)
    q4, s4, z4 = qf.quantize_int4(w, group_size)
    w16 = w.half().to(dev)
    q8, s8 = q8.to(dev), s8.to(dev)
    p4, s4, z4 = qf.pack_int4(q4).to(dev), s4.to(dev), z4.to(dev)
    ref8 = qf.dequantize_int8(q8, s8).half()
    ref4 = qf.dequantize_int4(qf.unpack_int4(p4), s4, z4, group_size).half()
    weight_bytes = {"fp16_cublas": w16.numel() * 2, "int8_triton": q8.numel() + s8.numel() * 4,
                    "int4_triton": p4.numel() + s4.numel() * 4 + z4.numel()}

    rows = []
    for m in M_VALUES:
        x = torch.randn(m, K, device=dev, dtype=torch.float16)
        methods: dict[str, Callable[[], torch.Tensor]] = {
            "fp16_cublas": lambda: F.linear(x, w16),
            "int8_triton": lambda: ops.int8_weight_only_linear(x, q8, s8, None),
            "int4_triton": lambda: ops.int4_weight_only_linear(x, p4, s4, z4, group_size, None),
        }
        err8 = (methods["int8_triton"]().float() - F.linear(x, ref8).float()).abs().max().item()
        err4 = (methods["int4_triton"]().float() - F.linear(x, ref4).float()).abs().max().item()
        for fn in methods.values():  # warm-up: JIT compile + autotune caches, cuBLAS handles
            _time_batch(fn, 3)
        samples: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(reps):
            for name, fn in methods.items():
                samples[name].append(_time_batch(fn, iters))
        med = {name: statistics.median(v) for name, v in samples.items()}
        for name in methods:
            rows.append({
                "M": m, "K": K, "N": N, "method": name, "median_us": med[name],
                "min_us": min(samples[name]), "speedup_vs_fp16": med["fp16_cublas"] / med[name],
                "weight_GBps": weight_bytes[name] / (med[name] * 1e-6) / 1e9,
                "max_abs_err_vs_dequant_fp16": {"int8_triton": err8, "int4_triton": err4}.get(name, 0.0),
            })
    return {
        "device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
        "dtype": "float16", "group_size": group_size, "reps": reps, "iters_per_rep": iters, "rows": rows,
    }


def to_markdown(result: dict) -> str:
    lines = [f"{result['device']}, fp16 activations, K=N={K}, int4 group_size={result['group_size']}", "",
             "| M | method | median us | speedup vs fp16 | weight GB/s |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['M']} | {r['method']} | {r['median_us']:.1f} | {r['speedup_vs_fp16']:.2f}x "
                     f"| {r['weight_GBps']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton not installed: skipped")
        return 0
    result = bench(args.reps, args.iters, args.group_size)
    print(to_markdown(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
