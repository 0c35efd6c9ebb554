"""The two kernels a speculative verify step multiplies, per query-row count, at SmolLM2-135M's decode shapes:
`optpass::decode_attention` (9 query / 3 KV heads, head dim 64, 1.2k valid of 2k cache slots) and
`optpass::gemv_int8` / `gemv_int8_packed` over one decode step's weights (30 blocks' q/k/v/o/gate/up/down + the 49k-row head,
per-channel and g32 scales), and int4 g32 over the 30 blocks' weights (the int4 arm keeps an int8 head):
`optpass::gemv_int4_packed` against aten's tinygemm (`_weight_int4pack_mm_for_cpu`, bf16 activations, what
`Int4Linear` runs without VNNI). Rows 1 = a one-token step; 6 = a verify step drafting 5 tokens. Times are per
whole step (30 layers). Interleaved rounds, medians (benchmarks/harness.py).

`--attention-baseline FILE.cpp` also builds an older copy of `decode_attention.cpp` (e.g. `git show
REV:backends/cpu/csrc/decode_attention.cpp > old.cpp`) under its own op namespace and times it in the same
rounds, so a kernel change is measured against what it replaces in one process.

    python benchmarks/verify_kernels.py [--rounds 7] [--attention-baseline old.cpp]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from optpass.backends.cpu import gemv_ops  # noqa: E402
from optpass.backends.cpu.quant_linear import tinygemm_layout  # noqa: E402

from benchmarks.harness import Variant, run_scenario  # noqa: E402

LAYERS, HQ, HKV, D, SLOTS, VALID = 30, 9, 3, 64, 2048, 1200
LINEARS = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # (out, in)
HEAD = (49152, 576)
ROWS = (1, 2, 4, 6, 8)


def build_baseline(source: Path) -> Callable:
    """The op of an older decode_attention.cpp, registered as optpass_baseline::decode_attention."""
    from torch.utils.cpp_extension import load

    text = source.read_text()
    text = re.sub(r"TORCH_LIBRARY_FRAGMENT\(optpass,", "TORCH_LIBRARY(optpass_baseline,", text)
    text = re.sub(r"TORCH_LIBRARY_IMPL\(optpass,", "TORCH_LIBRARY_IMPL(optpass_baseline,", text)
    copy = Path(tempfile.mkdtemp()) / "decode_attention_baseline.cpp"
    copy.write_text(text)
    csrc = Path(gemv_ops.__file__).parent / "csrc"  # the shared headers (vec_exp.h) the copy may include
    load("optpass_attention_baseline", [str(copy)], extra_cflags=gemv_ops.CFLAGS, extra_ldflags=gemv_ops.LDFLAGS,
         extra_include_paths=[str(csrc)], is_python_module=False, verbose=False)
    return torch.ops.optpass_baseline.decode_attention


def attention_inputs(rows: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(rows)
    q = torch.randn(1, HQ, rows, D, generator=g)
    k, v = torch.randn(1, HKV, SLOTS, D, generator=g), torch.randn(1, HKV, SLOTS, D, generator=g)
    mask = torch.zeros(1, 1, rows, SLOTS, dtype=torch.bool)
    for i in range(rows):
        mask[0, 0, i, :VALID + i] = True
    return q, k, v, mask


def attention_variant(name: str, op: Callable, rows: int) -> Variant:
    def measure(inputs: tuple[torch.Tensor, ...]) -> dict[str, float]:
        start = time.perf_counter()
        for _ in range(LAYERS):
            op(*inputs, 0.125, 0.0)
        return {"step_ms": (time.perf_counter() - start) * 1e3}

    return Variant(f"{name} rows={rows}", lambda: attention_inputs(rows), measure,
                   note=f"{LAYERS} layers, {VALID} of {SLOTS} slots valid")


def gemv_variant(rows: int, scales: str, packed: bool) -> Variant:
    """scales: "per-channel" or "g32"; packed: the packed layout (what Int8Linear runs on VNNI CPUs) or the
    [N, K] row layout."""
    grouped = scales == "g32"

    def setup() -> list[tuple]:
        g = torch.Generator().manual_seed(0)
        out = []
        for n, k in LINEARS * LAYERS + [HEAD]:
            q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
            scale = torch.rand(n, k // 32, generator=g) if grouped else torch.rand(n, generator=g)
            if packed:
                q, scale = gemv_ops.pack_rows(q), gemv_ops.pack_group_scales(scale, 32) if grouped else scale
            out.append((torch.randn(rows, k, generator=g), q, scale, n))
        return out

    def measure(calls: list[tuple]) -> dict[str, float]:
        start = time.perf_counter()
        for x, weight, scale, n in calls:
            if packed:
                torch.ops.optpass.gemv_int8_packed(x, weight, scale, n)
            else:
                torch.ops.optpass.gemv_int8(x, weight, scale)
        return {"step_ms": (time.perf_counter() - start) * 1e3}

    return Variant(f"gemv_int8 {scales} {'packed' if packed else 'rows'} rows={rows}", setup, measure,
                   note="every linear of a SmolLM2 decode step, int8 weights")


def gemv_int4_variant(rows: int, kernel: str) -> Variant:
    """kernel: "packed" (optpass's VNNI GEMV) or "tinygemm" (aten), int4 g32 with float zero points."""
    aten = torch.ops.aten

    def setup() -> list[tuple]:
        g = torch.Generator().manual_seed(0)
        out = []
        for n, k in LINEARS * LAYERS:
            q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
            scale, zero = torch.rand(n, k // 32, generator=g) / 50 + 1e-3, torch.rand(n, k // 32, generator=g) * 15
            x = torch.randn(rows, k, generator=g)
            if kernel == "packed":
                out.append((x, *gemv_ops.pack_int4_rows(q, scale, zero, 32), n))
            else:
                out.append((x, *tinygemm_layout(q, scale, zero, torch.bfloat16)))
        return out

    def measure(calls: list[tuple]) -> dict[str, float]:
        start = time.perf_counter()
        for call in calls:
            if kernel == "packed":
                torch.ops.optpass.gemv_int4_packed(*call)
            else:
                x, weight, sz = call
                aten._weight_int4pack_mm_for_cpu(x.bfloat16(), weight, 32, sz).float()
        return {"step_ms": (time.perf_counter() - start) * 1e3}

    return Variant(f"gemv_int4 g32 {kernel} rows={rows}", setup, measure,
                   note="the 210 block linears of a SmolLM2 decode step, int4 g32 weights (no head)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attention-baseline", type=Path, help="an older decode_attention.cpp to time alongside")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not gemv_ops.available():
        raise SystemExit("optpass's C++ kernels could not be built here; nothing to measure")
    ops = {"decode_attention": torch.ops.optpass.decode_attention}
    if args.attention_baseline:
        ops["decode_attention baseline"] = build_baseline(args.attention_baseline)
    variants = [attention_variant(name, op, rows) for rows in (1, 6) for name, op in ops.items()]
    layouts = (True, False) if gemv_ops.packed_available() else (False,)
    variants += [gemv_variant(rows, scales, packed) for scales in ("per-channel", "g32") for packed in layouts
                 for rows in ROWS]
    int4_kernels = ("packed", "tinygemm") if gemv_ops.packed_available() else ("tinygemm",)
    variants += [gemv_int4_variant(rows, kernel) for kernel in int4_kernels for rows in ROWS]
    run_scenario("verify_kernels_smollm2", variants, rounds=args.rounds,
                 extra={"attention_baseline": str(args.attention_baseline) if args.attention_baseline else None})


if __name__ == "__main__":
    main()
