"""The sliding-window + linear-attention hybrid of a converted layer (LoLCATs): each query attends with exact
softmax to each row's first `sink` real keys plus the last `window` keys, and with linear attention
phi_q(q).phi_k(k) to every earlier real key, under one shared normaliser:

    out = (sum_near exp(s - m) v + g * sum_far (phi_q(q).phi_k(k)) v) / (sum_near exp(s - m) + g * sum_far phi_q(q).phi_k(k))

with m the largest exact logit of the query's near span (LoLCATs' formulation: the exact terms are at most 1 and
the linear ones keep their own scale, so the mix depends only on the keys each form sees, identically in both
forms below) and g the per-head gain of `HedgehogMaps`. The query's own key is always near, so the denominator
is at least 1 for a real query; padding rows get 0 (never NaN, which the next layer's values would spread).

Two forms computing the same function: `parallel` (prefill, and Hugging Face's own decode loop over a full
cache: numerically right, no memory saved), chunked over queries so an 8k prefill fits memory; and
`HybridLayer`, a cache layer for optpass's decode runtime holding sinks + window in `RingLayer`'s ring plus the
constant-size state S = sum phi_k(k) v^T [B, Hk, F, D] and z = sum phi_k(k) [B, Hk, F], into which a token is
folded when it leaves the ring. Memory per layer is constant in the context.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from optpass.backends.kv.band import banded
from optpass.backends.kv.ring import RingLayer
from optpass.backends.linear.feature_map import HedgehogMaps

CHUNK_ELEMENTS = 1 << 24  # scores per query chunk of the parallel form (64 MiB in fp32)


def span_masks(mask: Any, q_len: int, k_len: int, sink: int, window: int, device: torch.device
               ) -> tuple[Tensor, Tensor]:
    """(near, far) bool [B or 1, 1, Q, K]: keys attended exactly (sinks + window, as `band.banded` narrows a local
    layer's mask) and linearly (every other key the model's own mask allows). `mask` as attention functions get
    it: None (causal), bool (True = attend) or additive float."""
    if mask is None:
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)[None, None]
    else:
        allowed = mask if mask.dtype == torch.bool else mask == 0
    near = banded(allowed, q_len, k_len, sink, window, device)
    return near, allowed & ~near


def mix(query: Tensor, key: Tensor, value: Tensor, phi_q: Tensor, phi_k: Tensor | None, near: Tensor,
        far: Tensor | None, scale: float, gain: Tensor, softcap: float | None = None,
        state: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Hybrid attention of `query` rows [B, Hq, Q, D] over `key` / `value` [B, Hk, K, D] (GQA: query heads
    grouped per key head, never copied per query head): exact over `near`, linear over `far` (masks
    [B | 1, 1, Q, K]; far None = no linear key among these), plus the linear contribution of keys summarised in
    `state` (S [B, Hk, F, D], z [B, Hk, F]; the decode state, or a chunk's shared past while fitting). phi_q
    [B, Hq, Q, F], phi_k [B, Hk, K, F], gain [Hq]. Differentiable (attention transfer trains through it).
    [B, Hq, Q, D] fp32."""
    b, hq, q_len, d = query.shape
    hk, k_len = key.shape[1], key.shape[2]
    g = hq // hk

    def grouped(x: Tensor) -> Tensor:  # [B, Hq, Q, X] -> [B, Hk, G * Q, X]: one matmul per key head
        return x.reshape(b, hk, g * q_len, x.shape[-1])

    logits = (grouped(query.float()) @ key.float().transpose(-1, -2) * scale).view(b, hk, g, q_len, k_len)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    near5 = near[:, :, None]  # [B, 1, 1, Q, K] against [B, Hk, G, Q, K]
    top = logits.masked_fill(~near5, float("-inf")).amax(-1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = (logits - top).masked_fill(~near5, float("-inf")).exp()  # fill before exp: no inf * 0 in backward
    gain5 = gain.view(1, hk, g, 1, 1)
    if far is not None:
        linear = (grouped(phi_q) @ phi_k.transpose(-1, -2)).view(b, hk, g, q_len, k_len)
        weights = weights + linear.masked_fill(~far[:, :, None], 0.0) * gain5
    num = weights.view(b, hk, g * q_len, k_len) @ value.float()
    den = weights.sum(-1).view(b, hk, g * q_len, 1)
    if state is not None:
        scaled = grouped((phi_q.view(b, hk, g, q_len, -1) * gain5).view(b, hq, q_len, -1))
        num = num + scaled @ state[0]
        den = den + scaled @ state[1][..., None]
    return (num / den.clamp_min(1e-30)).view(b, hq, q_len, d)


def parallel(query: Tensor, key: Tensor, value: Tensor, mask: Any, sink: int, window: int, maps: HedgehogMaps,
             scale: float, softcap: float | None = None) -> Tensor:
    """The hybrid over a whole prompt (or a decode step over a full cache), in query chunks of about
    CHUNK_ELEMENTS scores. A chunk reads keys only up to its last query's latest possible position (the mask is
    causal: a query row is at most at its own index counted from the end), which halves a prefill's work.
    Returns [B, Q, Hq, D] in the query's dtype, as transformers' attention functions do."""
    b, hq, q_len, _ = query.shape
    k_len = key.shape[2]
    near, far = span_masks(mask, q_len, k_len, sink, window, query.device)
    phi_k, gain = maps.key(key), maps.gain()
    rows = max(1, CHUNK_ELEMENTS // (b * hq * k_len))
    outs = []
    for i in range(0, q_len, rows):
        j, end = min(i + rows, q_len), k_len - q_len + min(i + rows, q_len)
        q = query[:, :, i:j]
        outs.append(mix(q, key[:, :, :end], value[:, :, :end], maps.query(q), phi_k[:, :, :end],
                        near[:, :, i:j, :end], far[:, :, i:j, :end], scale, gain, softcap))
    return torch.cat(outs, dim=2).transpose(1, 2).to(query.dtype).contiguous()


class HybridLayer(RingLayer):
    """A converted layer's decode cache: `RingLayer`'s sinks + ring (exact keys) and the linear state (S, z) in
    fp32, [B, Hk, F, D] and [B, Hk, F] with F = 2 * head_dim (`HedgehogMaps`). Each decode step folds the token
    leaving the ring (position now - ring) into the state before its slot is overwritten. Ring slots older than
    the window (the `slack` a speculative step may roll back) are attended linearly from the ring, so a rollback
    of up to `slack` tokens never needs to take anything out of the state."""

    def __init__(self, window: int, bits: int | None = None, layer_idx: int = 0, slack: int = 0, sink: int = 0) -> None:
        super().__init__(window, bits, layer_idx, slack, sink)
        self.storage_names = (*self.storage_names, "state", "norm")

    def allocate(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        super().allocate(batch, heads, head_dim, dtype, device)
        feat = 2 * head_dim
        self.state = torch.zeros(batch, heads, feat, head_dim, dtype=torch.float32, device=device)
        self.norm = torch.zeros(batch, heads, feat, dtype=torch.float32, device=device)

    def reset(self) -> None:
        super().reset()
        if self.store is not None:
            self.state.zero_()
            self.norm.zero_()

    def load_prompt(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("a hybrid (linear attention) layer's state needs its feature maps; replaying a "
                                  "recorded prompt is not supported")

    def prefill(self, query: Tensor, key: Tensor, value: Tensor, valid: Tensor | None, scaling: float,
                maps: HedgehogMaps | None = None) -> None:
        """Sinks and the prompt's last `ring` tokens go to the ring; every other real token into the state."""
        if maps is None:
            raise RuntimeError(f"hybrid layer {self.layer_idx}: its attention module has no feature maps")
        super().prefill(query, key, value, valid, scaling)
        self.state.zero_()
        self.norm.zero_()
        old = key.shape[2] - self.ring
        if old <= 0:
            return
        if valid is None:
            valid = torch.ones(key.shape[0], key.shape[2], dtype=torch.bool, device=key.device)
        folded = (valid & (valid.cumsum(1) > self.sink))[:, :old]  # real, not a sink  [B, old]
        phi = maps.key(key[:, :, :old]) * folded[:, None, :, None]
        self.state.add_(phi.transpose(-1, -2) @ value[:, :, :old].float())
        self.norm.add_(phi.sum(2))

    def decode(self, query: Tensor, key: Tensor, value: Tensor, scaling: float, softcap: float | None,
               maps: HedgehogMaps | None = None) -> Tensor:
        """Fold the token leaving the ring into the state, store the new one, attend: exact over sinks + window,
        linear over the state (and ring slots past the window). [B, Hq, 1, D]"""
        now = self.t.to(torch.int32)
        self._fold(now, maps)
        self._write(key, value)
        keys, values = self.store.decode_keys(), self.store.decode_values()
        self.t.add_(1)
        near = self._exact(now)[:, None, None, :]  # [B, 1, 1, C]
        far = phi_k = None
        if self.ring > self.window:  # slack slots past the window: linear, read from the ring
            slots = torch.arange(self.capacity, device=key.device)
            far = ((self.age >= 0) & (self.age <= now - self.window) & (slots >= self.sink))[:, None, None, :]
            phi_k = maps.key(keys)
        out = mix(query, keys, values, maps.query(query), phi_k, near, far, scaling, maps.gain(), softcap,
                  (self.state, self.norm))
        return out.to(query.dtype)

    def _fold(self, now: Tensor, maps: HedgehogMaps) -> None:
        """Add the occupant of the next ring slot to the state if it is the token leaving the ring (position
        now - ring; a rolled-back draft's stale slot is not), and mark the slot empty."""
        b = self.age.shape[0]
        slot = self._slot().view(b, 1)
        age = self.age.gather(1, slot)  # [B, 1]
        leaving = (age >= 0) & (age == now - self.ring)
        keys, values = self.store.decode_keys(), self.store.decode_values().float()  # [B, Hk, C, D]
        index = slot[:, None, :, None].expand(b, keys.shape[1], 1, keys.shape[-1])
        keys, values = keys.gather(2, index), values.gather(2, index)
        phi = maps.key(keys) * leaving[:, None, :, None]  # [B, Hk, 1, F]
        self.state.add_(phi.transpose(-1, -2) @ values)
        self.norm.add_(phi.sum(2))
        self.age.scatter_(1, slot, torch.where(leaving, -1, age))
