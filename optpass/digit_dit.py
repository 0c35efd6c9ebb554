"""A small class-conditional diffusers DiT trained on scikit-learn's 8x8 digits (upsampled to 16x16).

Random weights show none of the step-to-step redundancy that DiT caching exploits, and no pretrained DiT
can be fetched here, so this module trains one offline (deterministic seed, ~5 minutes on one CPU core)
and caches the checkpoint in `optpass.models.cache_dir()`. The default recipe's result ships with optpass
(`optpass/weights/`, 2.3 MB, made by `examples/train_digit_dit.py --retrain`), so first use does not train.
The deterministic DDIM loop that calibration, tests and benchmarks share is `optpass.sampling.ddim_sample` (same
cosine noise schedule as training).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from optpass.sampling import make_scheduler

_CACHE_FORMAT = "v1"
_SHIPPED = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class DigitDitRecipe:
    """Architecture and training schedule; changing a field changes the cached checkpoint's name."""

    layers: int = 6
    heads: int = 4
    head_dim: int = 16
    image_size: int = 16
    patch: int = 4
    steps: int = 3000
    batch: int = 64
    lr: float = 1e-3
    seed: int = 0

    def tag(self) -> str:
        return (f"L{self.layers}h{self.heads}x{self.head_dim}s{self.image_size}p{self.patch}n{self.steps}b{self.batch}"
                f"lr{self.lr:g}seed{self.seed}-{_CACHE_FORMAT}")


def build_dit(recipe: DigitDitRecipe) -> nn.Module:
    """An untrained DiT of the recipe's shape: 1 channel in/out (epsilon prediction), 10 classes."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(recipe.seed)
    return DiTTransformer2DModel(
        num_attention_heads=recipe.heads, attention_head_dim=recipe.head_dim, in_channels=1, out_channels=1,
        num_layers=recipe.layers, sample_size=recipe.image_size, patch_size=recipe.patch,
        num_embeds_ada_norm=10, norm_type="ada_norm_zero",
    )


def digits_dataset(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 1,797 8x8 digits as [N, 1, size, size] in [-1, 1] (bilinear upsampling) and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1, torch.tensor(data.target, dtype=torch.long)


def train_digit_dit(recipe: DigitDitRecipe = DigitDitRecipe(), log_every: int = 100) -> nn.Module:
    """Train the DiT with the epsilon objective; deterministic for a given recipe and torch build."""
    from optpass.progress import track

    images, labels = digits_dataset(recipe.image_size)
    model = build_dit(recipe).train()
    scheduler = make_scheduler("ddpm")
    g = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    warmup = max(1, recipe.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, recipe.steps) / recipe.steps)))
    start, losses = time.perf_counter(), []
    for step in track(range(recipe.steps), "training digit DiT", total=recipe.steps):
        idx = torch.randint(0, images.shape[0], (recipe.batch,), generator=g)
        x0, y = images[idx], labels[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (recipe.batch,), generator=g)
        xt = scheduler.add_noise(x0, noise, t)
        pred = model(xt, timestep=t, class_labels=y, return_dict=False)[0]
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"[digit-dit] step {step + 1}/{recipe.steps} loss {sum(losses[-log_every:]) / log_every:.4f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
    return model.eval()


def shipped_checkpoint(recipe: DigitDitRecipe) -> Path | None:
    """The checkpoint packaged with optpass for this recipe, if there is one (the default recipe's)."""
    path = _SHIPPED / f"digit-dit-{recipe.tag()}"
    return path if (path / "config.json").exists() else None


def load_digit_dit(recipe: DigitDitRecipe = DigitDitRecipe(), retrain: bool = False) -> nn.Module:
    """The trained digit DiT: the packaged checkpoint if the recipe has one, else trained and cached on first
    use (atomic write: a partial cache is never read). `retrain` always trains and writes the cache."""
    from diffusers import DiTTransformer2DModel

    from optpass.models import cache_dir
    from optpass.progress import status

    shipped = shipped_checkpoint(recipe)
    if shipped is not None and not retrain:
        return DiTTransformer2DModel.from_pretrained(str(shipped)).eval()
    out = cache_dir() / f"digit-dit-{recipe.tag()}"
    if retrain or not (out / "config.json").exists():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small matmuls: one thread is as fast, and the result does not depend on cores
        try:
            with status(f"training the digit DiT once ({recipe.steps} steps, a few minutes on CPU)"):
                model = train_digit_dit(recipe)
        finally:
            torch.set_num_threads(threads)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)
    return DiTTransformer2DModel.from_pretrained(str(out)).eval()
