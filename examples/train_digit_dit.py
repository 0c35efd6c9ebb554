"""Train (or load from the cache) the class-conditional digit DiT and save a PNG grid of its samples.

    python examples/train_digit_dit.py            # loads the checkpoint that ships in optpass/weights/
    python examples/train_digit_dit.py --retrain  # train from scratch (~5 min on CPU, deterministic seed)

The model is a diffusers `DiTTransformer2DModel` (6 blocks, 4 heads x 16, patch 4) trained with the epsilon
objective on scikit-learn's 1,797 8x8 digits upsampled to 16x16; `optimize("tiny-dit", ...)` loads the same one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from optpass.digit_dit import DigitDitRecipe, load_digit_dit
from optpass.sampling import ddim_sample, save_grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--steps", type=int, default=50, help="DDIM sampling steps for the grid")
    ap.add_argument("--out", default="digit_dit_samples.png")
    args = ap.parse_args()
    start = time.perf_counter()
    model = load_digit_dit(DigitDitRecipe(), retrain=args.retrain)
    print(f"model ready in {time.perf_counter() - start:.0f}s")
    rows = {f"seed row {r}": ddim_sample(model, list(range(10 * r, 10 * r + 10)), list(range(10)), args.steps)
            for r in range(3)}
    save_grid(rows, args.out)
    print(f"samples (columns are classes 0-9): {Path(args.out).resolve()}")


if __name__ == "__main__":
    main()
