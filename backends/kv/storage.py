"""Packed KV slot storage, KIVI-style: keys quantized per channel (one scale per head and channel, fixed at
prefill with headroom, because key outliers live in channels), values per token. int4 packs two values per
byte along the head dim. `bits=None` stores the model's float dtype. All writes are static-shape index
ops so a fixed-budget decode step compiles and exports."""

from __future__ import annotations

import torch

KEY_HEADROOM = 1.25  # decode-time keys may exceed the prompt's per-channel range a little


def _qmax(bits: int) -> int:
    return 127 if bits == 8 else 7


class SlotStore:
    """`capacity` KV slots per (batch, kv head): quantized keys/values plus their scales."""

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, bits: int | None, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.bits = bits
        self.dtype = dtype
        d_stored = head_dim // 2 if bits == 4 else head_dim
        store_dtype = {None: dtype, 8: torch.int8, 4: torch.uint8}[bits]
        shape = (batch, heads, capacity, d_stored)
        self.keys = torch.zeros(shape, dtype=store_dtype, device=device)
        self.values = torch.zeros(shape, dtype=store_dtype, device=device)
        self.key_scale = torch.ones(batch, heads, 1, head_dim, dtype=torch.float32, device=device)
        self.value_scale = torch.ones(batch, heads, capacity, 1, dtype=torch.float32, device=device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys, "values": self.values, "key_scale": self.key_scale, "value_scale": self.value_scale}

    def set_key_scale(self, keys: torch.Tensor, valid: torch.Tensor) -> None:
        """Per-channel key scales from the prompt's valid keys [B, H, S, D] (valid [B, S])."""
        if self.bits is None:
            return
        amax = keys.float().abs().masked_fill(~valid[:, None, :, None], 0).amax(2, keepdim=True)
        self.key_scale.copy_((amax * KEY_HEADROOM / _qmax(self.bits)).clamp_min(1e-6))

    def encode(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Float keys/values [B, H, N, D] -> stored keys, stored values, value scales [B, H, N, 1]."""
        if self.bits is None:
            return keys.to(self.dtype), values.to(self.dtype), torch.ones_like(values[..., :1], dtype=torch.float32)
        q = _qmax(self.bits)
        v_scale = (values.float().abs().amax(-1, keepdim=True) / q).clamp_min(1e-6)
        kq = torch.round(keys.float() / self.key_scale).clamp(-q, q)
        vq = torch.round(values.float() / v_scale).clamp(-q, q)
        if self.bits == 8:
            return kq.to(torch.int8), vq.to(torch.int8), v_scale
        return _pack4(kq), _pack4(vq), v_scale

    def decode_keys(self) -> torch.Tensor:
        """All stored keys as float32 [B, H, C, D]."""
        if self.bits is None:
            return self.keys.float()
        raw = self.keys.float() if self.bits == 8 else _unpack4(self.keys)
        return raw * self.key_scale

    def decode_values(self) -> torch.Tensor:
        if self.bits is None:
            return self.values.float()
        raw = self.values.float() if self.bits == 8 else _unpack4(self.values)
        return raw * self.value_scale

    def write(self, index: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, where: torch.Tensor | None = None) -> None:
        """Store float `keys`/`values` [B, H, N, D] at slot `index` [B, H, N]; rows where `where` [B, H, N] is
        False keep their old content."""
        k, v, vs = self.encode(keys, values)
        for dst, src in ((self.keys, k), (self.values, v), (self.value_scale, vs)):
            idx = index[..., None].expand(*index.shape, dst.shape[-1])
            if where is not None:
                src = torch.where(where[..., None], src, dst.gather(2, idx))
            dst.scatter_(2, idx, src)


def _pack4(q: torch.Tensor) -> torch.Tensor:
    u = (q + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _unpack4(packed: torch.Tensor) -> torch.Tensor:
    low = (packed & 0xF).float() - 8
    high = (packed >> 4).float() - 8
    return torch.stack((low, high), dim=-1).flatten(-2)
