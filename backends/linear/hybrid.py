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


def mix(query: Tensor, key: Tensor, value: Tensor, phi_q: Tensor, phi_k: Tensor, near: Tensor, far: Tensor,
        scale: float, gain: Tensor, softcap: float | None = None) -> Tensor:
    """Hybrid attention of `query` rows [B, Hq, Q, D] over `key` / `value` [B, Hk, K, D] (GQA: query heads
    grouped per key head), given phi_q [B, Hq, Q, F], phi_k [B, Hk, K, F], masks [B | 1, 1, Q, K] and gain [Hq].
    Differentiable (attention transfer trains through it). [B, Hq, Q, D] fp32."""
    b, hq, q_len, d = query.shape
    hk = key.shape[1]
    g = hq // hk
    near5, far5 = near[:, :, None], far[:, :, None]  # [B, 1, 1, Q, K] against [B, Hk, G, Q, K]
    logits = query.float().view(b, hk, g, q_len, d) @ key.float()[:, :, None].transpose(-1, -2) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    top = logits.masked_fill(~near5, float("-inf")).amax(-1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    exact = (logits - top).masked_fill(~near5, float("-inf")).exp()  # fill before exp: no inf * 0 in backward
    linear = phi_q.view(b, hk, g, q_len, -1) @ phi_k[:, :, None].transpose(-1, -2)
    weights = exact + linear.masked_fill(~far5, 0.0) * gain.view(1, hk, g, 1, 1)
    out = (weights @ value.float()[:, :, None]) / weights.sum(-1, keepdim=True).clamp_min(1e-30)
    return out.view(b, hq, q_len, d)


def parallel(query: Tensor, key: Tensor, value: Tensor, mask: Any, sink: int, window: int, maps: HedgehogMaps,
             scale: float, softcap: float | None = None) -> Tensor:
    """The hybrid over a whole prompt (or a decode step over a full cache), in query chunks of about
    CHUNK_ELEMENTS scores. Returns [B, Q, Hq, D] in the query's dtype, as transformers' attention functions do."""
    b, hq, q_len, _ = query.shape
    k_len = key.shape[2]
    near, far = span_masks(mask, q_len, k_len, sink, window, query.device)
    phi_k, gain = maps.key(key), maps.gain()
    rows = max(1, CHUNK_ELEMENTS // (b * hq * k_len))
    outs = [mix(query[:, :, i:i + rows], key, value, maps.query(query[:, :, i:i + rows]), phi_k,
                near[:, :, i:i + rows], far[:, :, i:i + rows], scale, gain, softcap)
            for i in range(0, q_len, rows)]
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
        b, h, _, d = key.shape
        hq = query.shape[1]
        now = self.t.to(torch.int32)
        self._fold(now, maps)
        self._write(key, value)
        keys, values = self.store.decode_keys().float(), self.store.decode_values().float()
        self.t.add_(1)
        near = self._exact(now)[:, None, None, :]  # [B, 1, 1, C]
        q = query.float().view(b, h, hq // h, d)
        logits = torch.einsum("bhgd,bhwd->bhgw", q, keys) * scaling
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        logits = logits.masked_fill(~near, float("-inf"))
        exact = (logits - logits.amax(-1, keepdim=True)).exp()
        phi_q = maps.query(query).view(b, h, hq // h, -1)  # [B, Hk, G, F]
        gain = maps.gain().view(1, h, hq // h, 1)
        num = exact @ values + gain * (phi_q @ self.state)
        den = exact.sum(-1, keepdim=True) + gain * (phi_q @ self.norm[..., None])
        if self.ring > self.window:  # slack slots past the window: linear, read from the ring
            past = ((self.age >= 0) & (self.age <= now - self.window)
                    & (torch.arange(self.capacity, device=key.device) >= self.sink))[:, None, None, :]
            lin = (phi_q @ maps.key(keys).transpose(-1, -2)).masked_fill(~past, 0.0) * gain
            num, den = num + lin @ values, den + lin.sum(-1, keepdim=True)
        return (num / den).reshape(b, hq, 1, d).to(query.dtype)

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
