"""Per-row-count kernel timings for one SmolLM2 linear (576 -> 1536): fp32 `nn.Linear` against each kernel
Int8Linear / Int4Linear can dispatch to, and the dispatch they make. The row thresholds in
backends/cpu/quant_linear.py come from this table.

    python benchmarks/linear_kernels.py [--reps 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.ops import aten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import machine_info  # noqa: E402
from optpass.backends.cpu.quant_linear import Int4Linear, Int8Linear  # noqa: E402

ROWS = (1, 16, 32, 64, 128, 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 1536, bias=False)
    i8, i4 = Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, 32)
    lines = ["# linear_kernels", "", f"`python benchmarks/linear_kernels.py --reps {args.reps}` | {machine_info()['cpu']}, "
             f"{torch.get_num_threads()} threads | 576 -> 1536, median µs of {args.reps} interleaved calls", "",
             "| rows | fp32 linear | int8pack (bf16 act) | int4 tinygemm (bf16 act) | dequant int8 -> bf16 GEMM | "
             "dequant int4 -> bf16 GEMM | Int8Linear | Int4Linear |", "|---" * 8 + "|"]
    with torch.inference_mode():
        for m in ROWS:
            x = torch.randn(m, 576)
            xb = x.bfloat16()
            arms = {
                "fp32": lambda: torch.nn.functional.linear(x, lin.weight),
                "i8pack": lambda: aten._weight_int8pack_mm(xb, i8.qweight, i8.kernel_scale),
                "i4pack": lambda: aten._weight_int4pack_mm_for_cpu(xb, i4.kernel_weight, 32, i4.kernel_scales_zeros),
                "deq8": lambda: torch.nn.functional.linear(xb, i8.dequantized_weight().bfloat16()),
                "deq4": lambda: torch.nn.functional.linear(xb, i4.dequantized_weight().bfloat16()),
                "Int8Linear": lambda: i8(x),
                "Int4Linear": lambda: i4(x),
            }
            times: dict[str, list[float]] = {k: [] for k in arms}
            for f in arms.values():
                f()
            for _ in range(args.reps):
                for name, f in arms.items():
                    t = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t)
            med = {k: 1e6 * statistics.median(v) for k, v in times.items()}
            lines.append(f"| {m} | " + " | ".join(f"{med[k]:.0f}" for k in arms) + " |")
            print(lines[-1], flush=True)
    out = Path(__file__).parent / "results" / "linear_kernels.md"
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
