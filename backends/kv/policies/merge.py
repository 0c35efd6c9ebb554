"""Merging instead of dropping (D2O / KVCrush-style): an evicted token is folded into its most similar kept
token (cosine similarity of keys above a threshold), as a similarity-weighted average of keys and values,
so its information is attenuated rather than lost. An option to every eviction policy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from optpass.backends.kv.layer import CompressedLayer


def merge_evicted(kept_k: torch.Tensor, kept_v: torch.Tensor, kept_valid: torch.Tensor, keys: torch.Tensor,
                  values: torch.Tensor, dropped: torch.Tensor, dropped_valid: torch.Tensor,
                  threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill: fold each dropped token [B, H, E] into its nearest kept token; returns merged kept keys/values."""
    b, h, e = dropped.shape
    d = keys.shape[-1]
    idx = dropped[..., None].expand(b, h, e, d)
    drop_k, drop_v = keys.gather(2, idx).float(), values.gather(2, idx).float()
    sim = torch.einsum("bhed,bhnd->bhen", F.normalize(drop_k, dim=-1), F.normalize(kept_k.float(), dim=-1))
    sim = sim.masked_fill(~kept_valid[:, :, None, :], -2.0)
    best, nearest = sim.max(-1)  # [B, H, E]
    weight = torch.where(dropped_valid & (best > threshold), best, torch.zeros_like(best))
    target = nearest[..., None].expand(b, h, e, d)
    total_w = torch.ones_like(kept_k[..., 0], dtype=torch.float32).scatter_add(-1, nearest, weight)[..., None]
    new_k = kept_k.float().scatter_add(2, target, drop_k * weight[..., None]) / total_w
    new_v = kept_v.float().scatter_add(2, target, drop_v * weight[..., None]) / total_w
    return new_k.to(kept_k.dtype), new_v.to(kept_v.dtype)


def merge_victim(layer: CompressedLayer, victim: torch.Tensor, moving: torch.Tensor) -> None:
    """Decode: before slot `victim` [B, H, 1] is overwritten, fold its token into the most similar other slot.
    Static-shape (always computed, applied where the similarity clears the threshold)."""
    store = layer.store
    keys, values = store.decode_keys(), store.decode_values()
    b, h, c, d = keys.shape
    idx = victim[..., None].expand(b, h, 1, d)
    vk, vv = keys.gather(2, idx), values.gather(2, idx)
    sim = torch.einsum("bhd,bhcd->bhc", F.normalize(vk[:, :, 0], dim=-1), F.normalize(keys, dim=-1))
    invalid = (layer.age < 0) | (torch.arange(c, device=keys.device) == victim)
    sim = sim.masked_fill(invalid, -2.0)
    best, nearest = sim.max(-1, keepdim=True)  # [B, H, 1]
    victim_valid = layer.age.gather(-1, victim) >= 0
    apply = moving & victim_valid & (best > layer.merge_threshold)
    w = best.clamp_min(0)[..., None]
    nidx = nearest[..., None].expand(b, h, 1, d)
    merged_k = (keys.gather(2, nidx) + w * vk) / (1 + w)
    merged_v = (values.gather(2, nidx) + w * vv) / (1 + w)
    store.write(nearest, merged_k, merged_v, where=apply)
