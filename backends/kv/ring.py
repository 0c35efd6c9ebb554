"""A sliding-window layer's cache: a static ring of exactly the model's `window` slots, token `t` at slot
`t % window`, optionally packed int8 / int4 (`SlotStore`, KIVI layout).

Gemma-2/3 and Mistral attend to the last `window` tokens only, so the oldest slot is always the one to
overwrite: no scores, no eviction search. transformers' own static sliding layer branches on a Python counter,
which a compiled step that skips guards would freeze; this ring keeps its position in a tensor. Exact
against transformers' `DynamicSlidingWindowLayer` when unpacked (tested).
"""

from __future__ import annotations


import torch

from optpass.backends.kv.layer import OptpassLayer
from optpass.backends.kv.storage import SlotStore


class RingLayer(OptpassLayer):
    is_sliding = True
    storage_names = ("age", "t")

    def __init__(self, window: int, bits: int | None = None, layer_idx: int = 0, slack: int = 0) -> None:
        super().__init__()
        # `slack` extra slots keep the tokens a rejected draft overwrote (speculative decoding rolls back)
        self.window, self.capacity, self.bits, self.layer_idx = window, window + slack, bits, layer_idx
        self.seen = 0
        self.store: SlotStore | None = None
        self.record = False  # keep the prompt's (q, k, v, valid, scaling) for `CompressedKVCache.replay`
        self.prompt: tuple | None = None

    def allocate(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.store = SlotStore(batch, heads, self.capacity, head_dim, self.bits, dtype, device)
        self.age = torch.full((batch, self.capacity), -1, dtype=torch.int32, device=device)  # -1 = empty slot
        self.t = torch.zeros((), dtype=torch.long, device=device)
        self.keys = self.values = None
        self.is_initialized = True

    def reset(self) -> None:
        self.seen = 0
        if self.store is not None:
            self.t.zero_()
            self.age.fill_(-1)

    def prefill(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor | None,
                scaling: float) -> None:
        self._fill(key, value, valid)
        if self.record:
            self.prompt = (query, key, value, valid, scaling)

    def load_prompt(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor | None,
                    scaling: float) -> None:
        """Fill the ring from an already-attended prompt (a recording cache's), as `CompressedLayer` does."""
        if self.store is None:
            self.allocate(key.shape[0], key.shape[1], key.shape[3], key.dtype, key.device)
        self._fill(key, value, valid)
        self.seen = key.shape[2]

    def _fill(self, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Keep the prompt's last `window` tokens (padding stays an empty slot)."""
        b, h, s, _ = key.shape
        if valid is None:
            valid = torch.ones(b, s, dtype=torch.bool, device=key.device)
        self.age.fill_(-1)
        self.store.set_key_scale(key, valid)
        n = min(s, self.capacity)
        positions = torch.arange(s - n, s, device=key.device)
        slots = positions % self.capacity
        self.store.write(slots.expand(b, h, n), key[:, :, s - n:], value[:, :, s - n:])
        self.age[:, slots] = torch.where(valid[:, s - n:], positions, -1).to(torch.int32)
        self.t.fill_(s)

    is_croppable = True

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' convention for static layers: `crop(-n)` forgets the last n tokens (a rejected draft);
        their slots are overwritten next and masked until then."""
        if tokens_to_remove > 0 or -tokens_to_remove > self.capacity - self.window:
            raise RuntimeError(f"ring layer: cannot roll back {-tokens_to_remove} tokens with "
                               f"{self.capacity - self.window} slack slots")
        self.t.sub_(-tokens_to_remove)
        self.seen += tokens_to_remove

    def decode(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                softcap: float | None) -> torch.Tensor:
        """Write the new token over the oldest slot, then attend over the filled slots. [B, Hq, 1, D]"""
        b, h, _, _ = key.shape
        slot = (self.t % self.capacity).view(1)
        self.store.write(slot.expand(b, h, 1), key, value)
        now = self.t.to(torch.int32)
        self.age.index_copy_(1, slot, now.expand(b, 1))
        # the last `window` positions up to now (slots ahead of now are a rolled-back draft's)
        valid = ((self.age >= 0) & (self.age > now - self.window) & (self.age <= now))[:, None, None, :]  # [B, 1, 1, C]
        keys, values = self.store.decode_keys().to(query.dtype), self.store.decode_values().to(query.dtype)
        self.t.add_(1)
        # one query per head: plain ops (SDPA's per-call overhead was ~0.1 ms per layer at one query)
        hq, d = query.shape[1], query.shape[-1]
        q = query.view(b, h, hq // h, d)
        logits = torch.einsum("bhgd,bhwd->bhgw", q, keys) * scaling
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        probs = logits.masked_fill(~valid, float("-inf")).softmax(-1)
        return torch.einsum("bhgw,bhwd->bhgd", probs, values).reshape(b, hq, 1, d)
