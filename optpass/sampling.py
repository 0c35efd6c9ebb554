"""Deterministic diffusion sampling shared by DiT cache calibration, tests and benchmarks.

A cache must be judged on the whole sampling loop (its error compounds over steps), not on one forward,
so calibration, the tests and the benchmark all call `ddim_sample`: diffusers' `DDIMScheduler` (eta=0),
one seeded starting latent per image, the model called once per step with the batch, as a pipeline does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from optpass.quality import psnr, rel_l2

# (model, latents [B, C, H, W], timestep [B], labels [B] or None) -> predicted noise [B, >=C, H, W]
DenoiseFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def make_scheduler(kind: str = "ddim", num_train_timesteps: int = 1000) -> Any:
    """The noise schedule the digit DiT is trained with (cosine); `kind` is "ddim" (sampling) or "ddpm"."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind == "ddpm":
        return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2")
    return DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                         clip_sample=False, set_alpha_to_one=False)


def default_denoise(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """diffusers transformers take keywords and return a tuple; a plain DiT is called `model(x, t, y)`."""
    if type(model).__module__.startswith("diffusers"):
        kwargs = {"class_labels": y} if y is not None else {}
        return model(x, timestep=t, return_dict=False, **kwargs)[0]
    return model(x, t, y) if y is not None else model(x, t)


def initial_noise(channels: int, size: int, seeds: Sequence[int]) -> torch.Tensor:
    """One deterministic starting latent per seed, stacked [len(seeds), C, H, W]."""
    return torch.stack([torch.randn(channels, size, size, generator=torch.Generator().manual_seed(int(k)))
                        for k in seeds])


def _shape(model: nn.Module) -> tuple[int, int]:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "in_channels"):
        return int(config.in_channels), int(config.sample_size)
    return int(model.in_channels), int(model.input_size)


def guided(denoise: DenoiseFn, scale: float, null_label: int) -> DenoiseFn:
    """Classifier-free guidance as DiTPipeline does it: one call on [cond; uncond] (the null class), then
    eps = eps_u + scale * (eps_c - eps_u). The model, and so a block cache, sees the doubled batch."""
    def fn(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        eps = denoise(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_label)]))
        cond, uncond = eps[:, : x.shape[1]].chunk(2)
        return uncond + scale * (cond - uncond)
    return fn


@torch.no_grad()
def ddim_sample(model: nn.Module, seeds: Sequence[int], labels: Sequence[int] | None = None, steps: int = 50,
                denoise: DenoiseFn = default_denoise, scheduler: Any = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """Sample [len(seeds), C, H, W] images with DDIM (eta=0); same seeds + labels => same images.
    `guidance_scale` > 1 applies classifier-free guidance (class-conditional diffusers DiTs: null class = N)."""
    if labels is not None and len(labels) != len(seeds):
        raise ValueError(f"ddim_sample: {len(seeds)} seeds but {len(labels)} labels")
    scheduler = scheduler or make_scheduler("ddim")
    scheduler.set_timesteps(steps)
    channels, size = _shape(model)
    x = initial_noise(channels, size, seeds)
    y = torch.tensor(list(labels), dtype=torch.long) if labels is not None else None
    if guidance_scale != 1.0 and y is not None:
        denoise = guided(denoise, guidance_scale, int(model.config.num_embeds_ada_norm))
    for t in scheduler.timesteps:
        eps = denoise(model, x, t.expand(x.shape[0]), y)
        x = scheduler.step(eps[:, :channels], t, x).prev_sample
    return x


def image_metrics(ref: torch.Tensor, new: torch.Tensor) -> dict[str, float]:
    """Worst image of a batch: min PSNR (data range 2, images in [-1, 1]) and max relative L2."""
    return {"psnr": min(psnr(r, n, data_range=2.0) for r, n in zip(ref, new)),
            "rel_l2": max(rel_l2(r, n) for r, n in zip(ref, new))}


def save_grid(rows: dict[str, torch.Tensor], path: str) -> None:
    """Write a PNG: one row per entry (name -> [N, 1, H, W] images in [-1, 1]), names to the left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(v.shape[0] for v in rows.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9 + 2.0, len(rows) * 0.95), squeeze=False)
    for r, (name, imgs) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r][c]
            ax.axis("off")
            if c < imgs.shape[0]:
                ax.imshow(imgs[c, 0].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
        axes[r][0].text(-0.15, 0.5, name, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=7)
    fig.subplots_adjust(left=0.25, wspace=0.05, hspace=0.1)
    fig.savefig(path, dpi=100)
    plt.close(fig)
