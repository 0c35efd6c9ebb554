"""2D-local block-sparse attention at DiT shapes: dense SDPA (bidirectional) vs the `local_2d` layout lowered by
FlexAttention, on image-token grids of 4k-16k tokens, and exactness against dense attention restricted to the
kept blocks; then the trained digit DiT: what the pass decides there, and the sampled images' PSNR under 2D
windows (the quality side; random weights say nothing about it).

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
from torch.overrides import TorchFunctionMode

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


class WindowSdpa(TorchFunctionMode):
    """Every bidirectional SDPA call over a `side x side` grid attends only within a 2D window: token level
    (`|dr| <= r and |dc| <= r`), or at the granularity of one grid row per block (`|dr| <= r`, what the block layout
    runs with `side`-token blocks). Masked dense attention: the same math as the sparse lowering, used for quality."""

    def __init__(self, side: int, radius: int, rows_only: bool) -> None:
        super().__init__()
        pos = torch.arange(side * side)
        dr = (pos[:, None] // side - pos[None, :] // side).abs()
        dc = (pos[:, None] % side - pos[None, :] % side).abs()
        self.mask = (dr <= radius) if rows_only else (dr <= radius) & (dc <= radius)
        self.tokens = side * side

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args[0].shape[-2] == self.tokens == args[1].shape[-2]:
            return func(*args[:3], attn_mask=self.mask)
        return func(*args, **kwargs)


def digit_quality(steps: int, seeds: list[int]) -> dict:
    """The trained digit DiT: what the pass decides on it, and the sampled images' PSNR (vs dense attention) of
    2D windows at token and at row-block granularity, so a refusal comes with the measured figure."""
    import optpass
    from optpass.digit_dit import load_digit_dit
    from optpass.sampling import ddim_sample, image_metrics

    model = load_digit_dit()
    side = model.config.sample_size // model.config.patch_size
    report = optpass.optimize(model, passes=["sparse_attention"], quality_budget="psnr:30").optpass_report
    record = report.passes[0]
    labels = [s % 10 for s in seeds]
    reference = ddim_sample(model, seeds, labels, steps, guidance_scale=2.0)
    out = {"grid": [side, side], "pass": {"status": record.status, "reason": record.reason}, "windows": {}}
    for radius in range(1, side - 1):
        for rows_only in (True, False):
            with WindowSdpa(side, radius, rows_only):
                images = ddim_sample(model, seeds, labels, steps, guidance_scale=2.0)
            kept = float(WindowSdpa(side, radius, rows_only).mask.float().mean())
            name = f"radius {radius} {'row blocks' if rows_only else 'tokens'}"
            out["windows"][name] = {"kept_share": round(kept, 4), **{k: round(v, 3) for k, v in
                                                                    image_metrics(reference, images).items()}}
    return out


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
    ap.add_argument("--digit-steps", type=int, default=50, help="DDIM steps of the digit DiT quality part (0: skip)")
    ap.add_argument("--digit-seeds", type=int, default=8)
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
    if args.digit_steps:
        result["digit_dit"] = digit_quality(args.digit_steps, list(range(100, 100 + args.digit_seeds)))
        print(json.dumps({"digit_dit": result["digit_dit"]}, indent=1), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "sparse_attention_dit.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
