"""A plain-PyTorch DiT (no diffusers) for the DiT cache tests: patchify, AdaLN blocks `blk(h, c)`, unpatchify."""

from __future__ import annotations

import math

import torch
from torch import nn


class PlainBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, elementwise_affine=False), nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ada = nn.Linear(dim, 4 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, b1, s2, b2 = self.ada(c).unsqueeze(1).chunk(4, dim=-1)
        h = self.norm1(x) * (1 + s1) + b1
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x) * (1 + s2) + b2)


class PlainDiT(nn.Module):
    """forward(x [B, C, H, W], t [B], y [B]) -> predicted noise [B, C, H, W]."""

    def __init__(self, channels: int = 1, size: int = 8, patch: int = 2, dim: int = 32, depth: int = 4,
                 classes: int = 10, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.in_channels, self.input_size, self.patch, self.dim = channels, size, patch, dim
        self.embed = nn.Linear(channels * patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_emb = nn.Embedding(classes, dim)
        self.blocks = nn.ModuleList(PlainBlock(dim, 2) for _ in range(depth))
        self.out = nn.Linear(dim, channels * patch * patch)

    def _t_embed(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return self.t_mlp(torch.cat([args.cos(), args.sin()], dim=-1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        b, c, s, p = x.shape[0], self.in_channels, self.input_size, self.patch
        n = s // p
        h = x.reshape(b, c, n, p, n, p).permute(0, 2, 4, 1, 3, 5).reshape(b, n * n, c * p * p)
        h = self.embed(h) + self.pos
        cond = self._t_embed(t) + (self.y_emb(y) if y is not None else 0)
        for blk in self.blocks:
            h = blk(h, cond)
        out = self.out(h).reshape(b, n, n, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, s, s)
