"""Per-row-count kernel timings for every SmolLM2 linear shape: fp32 `nn.Linear` against each kernel
Int8Linear / Int4Linear can dispatch to, and the dispatch they make. The row thresholds in
backends/cpu/quant_linear.py come from this table.

    python benchmarks/linear_kernels.py [--reps 25]      # ~2 min
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import machine_info  # noqa: E402
from optpass.backends.cpu.quant_linear import Int4Linear, Int8Linear  # noqa: E402

SHAPES = {"q_proj / o_proj": (576, 576), "k_proj / v_proj": (192, 576), "gate / up": (1536, 576),
          "down": (576, 1536), "lm_head": (49152, 576)}  # (out, in)
ROWS = (1, 16, 32, 64, 128, 1024)
HEAD_ROWS = (1, 16, 128)
NEVER = 1 << 30


def arms(lin: torch.nn.Linear) -> dict[str, torch.nn.Module]:
    """fp32, each quantized kernel forced (by its row thresholds), and the default dispatch."""
    def forced(mod: torch.nn.Module, dequant_from: int, gemv: bool = False) -> torch.nn.Module:
        mod.use_gemv = gemv
        mod.refresh_kernels()  # int4 derives its packed GEMV copy or its tinygemm copy from `use_gemv`
        mod.dequant_min_rows = dequant_from
        return mod

    return {
        "fp32": lin,
        "int8 gemv (C++)": forced(Int8Linear.from_linear(lin), NEVER, gemv=True),
        "int8pack": forced(Int8Linear.from_linear(lin), NEVER),
        "int8 dequant + bf16 GEMM": forced(Int8Linear.from_linear(lin), 1),
        "int4 gemv (C++)": forced(Int4Linear.from_linear(lin, 32), NEVER, gemv=True),
        "int4 tinygemm": forced(Int4Linear.from_linear(lin, 32), NEVER),
        "int4 dequant + bf16 GEMM": forced(Int4Linear.from_linear(lin, 32), 1),
        "Int8Linear": Int8Linear.from_linear(lin),
        "Int4Linear": Int4Linear.from_linear(lin, 32),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=25)
    args = ap.parse_args()
    torch.manual_seed(0)
    header = None
    lines = ["# linear_kernels", "", f"`python benchmarks/linear_kernels.py --reps {args.reps}` | {machine_info()['cpu']}, "
             f"{torch.get_num_threads()} threads | median µs of {args.reps} interleaved calls (fewer for lm_head); "
             "the dequantize paths write bf16 weights into one reused workspace (`optpass::dequant_bf16_`)", ""]
    with torch.inference_mode():
        for shape, (n, k) in SHAPES.items():
            mods = arms(torch.nn.Linear(k, n, bias=False))
            if header is None:
                header = ["| layer (out x in) | rows | " + " | ".join(mods) + " |", "|---" * (len(mods) + 2) + "|"]
                lines += header
            for m in HEAD_ROWS if shape == "lm_head" else ROWS:
                x = torch.randn(m, k)
                reps = max(3, args.reps // 5) if shape == "lm_head" or m >= 1024 else args.reps
                times: dict[str, list[float]] = {name: [] for name in mods}
                for name, mod in mods.items():
                    if name != "int8 gemv (C++)" or m <= 8:
                        mod(x)
                for _ in range(reps):
                    for name, mod in mods.items():
                        if name == "int8 gemv (C++)" and m > 8:
                            continue
                        t = time.perf_counter()
                        mod(x)
                        times[name].append(time.perf_counter() - t)
                cells = [f"{1e6 * statistics.median(v):.0f}" if v else "-" for v in times.values()]
                lines.append(f"| {shape} ({n}x{k}) | {m} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    out = Path(__file__).parent / "results" / "linear_kernels.md"
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
