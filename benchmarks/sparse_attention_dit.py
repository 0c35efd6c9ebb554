"""2D-local block-sparse attention at DiT shapes: dense SDPA (bidirectional) vs the `local_2d` layout lowered by
FlexAttention, on image-token grids of 4k-16k tokens, and exactness against dense attention restricted to the
kept blocks.

Shapes are DiT-XL/2's attention (16 heads x 72, `DiTTransformer2DModel`'s default config); queries / keys / values
are random, so only time and exactness are measured here: random weights give diffuse attention, and no image-
quality claim rests on them. A peer in the same run: FlexAttention with a hand-written 2D-window `mask_mod` and
`create_block_mask` (what a user would write).

    python benchmarks/sparse_attention_dit.py [--grids 64,96,128] [--radii 8,16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import RESULTS, machine_info  # noqa: E402
from optpass.measure import interleaved_rounds  # noqa: E402

HEADS, DIM, BLOCK = 16, 72, 64


def timed(fn):
    def run() -> dict[str, float]:
        start = time.perf_counter()
        fn()
        return {"s": time.perf_counter() - start}
    return run


def user_window_mask(side: int, radius: int):
    from torch.nn.attention.flex_attention import create_block_mask

    def window(b, h, q, k):
        return ((q // side - k // side).abs() <= radius) & ((q % side - k % side).abs() <= radius)
    return create_block_mask(window, None, None, side * side, side * side, device="cpu", BLOCK_SIZE=BLOCK)


def main() -> None:
    from torch.nn.attention.flex_attention import flex_attention

    from optpass.backends.sparse import block_sparse_attention
    from optpass.backends.sparse.layout import dense_mask, density
    from optpass.backends.sparse.patterns import make_pattern

    ap = argparse.ArgumentParser()
    ap.add_argument("--grids", default="64,96,128")
    ap.add_argument("--radii", default="8,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--exact-up-to", type=int, default=9216, help="check exactness up to this many tokens")
    args = ap.parse_args()
    flex = torch.compile(flex_attention, dynamic=True)
    scale = DIM ** -0.5
    result = {"scenario": "sparse_attention_dit", "command": " ".join(["python", *sys.argv]), "machine": machine_info(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "heads": HEADS, "dim": DIM, "block": BLOCK, "grids": {}}
    for side in (int(x) for x in args.grids.split(",")):
        seq = side * side
        g = torch.Generator().manual_seed(side)
        q, k, v = (torch.randn(1, HEADS, seq, DIM, generator=g) for _ in range(3))
        fns = {"dense sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
        row: dict = {"tokens": seq, "layouts": {}}
        for radius in (int(x) for x in args.radii.split(",")):
            pattern = make_pattern({"name": "local_2d", "height": side, "width": side, "radius": radius})
            keep = pattern.block_mask(q, k, BLOCK)
            info = {"density": float(density(keep, causal=False)[0])}
            if seq <= args.exact_up_to:
                out = block_sparse_attention(q, k, v, keep, BLOCK, scale, causal=False)
                ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(keep, seq, seq, BLOCK, causal=False))
                info["max_abs_error_vs_dense_on_kept_blocks"] = float((out - ref).abs().max())
            row["layouts"][f"radius {radius}"] = info
            fns[f"optpass local_2d r{radius}"] = lambda keep=keep: block_sparse_attention(q, k, v, keep, BLOCK, scale,
                                                                                          causal=False)
            user = user_window_mask(side, radius)
            fns[f"peer flex 2D window r{radius}"] = lambda user=user: flex(q, k, v, block_mask=user, scale=scale)
        samples = interleaved_rounds({n: timed(f) for n, f in fns.items()}, args.rounds, warmup=1)
        medians = {n: sorted(s["s"])[len(s["s"]) // 2] for n, s in samples.items()}
        row["median_s"] = medians
        row["speedup_vs_dense"] = {n: medians["dense sdpa"] / t for n, t in medians.items()}
        result["grids"][str(side)] = row
        print(json.dumps({side: row}, indent=1), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "sparse_attention_dit.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
