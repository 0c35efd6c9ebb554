"""A sliding-window layer's cache: a static ring of exactly the model's `window` slots, token `t` at slot
`t % window`, optionally packed int8 / int4 (`SlotStore`, KIVI layout); optionally `sink` more slots ahead of
the ring that keep each row's first `sink` real tokens for good (StreamingLLM's attention sinks: a full-attention
layer made local by the `linear_attention` pass attends to sinks + window, `backends/kv/band.py`).

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

    def __init__(self, window: int, bits: int | None = None, layer_idx: int = 0, slack: int = 0, sink: int = 0) -> None:
        super().__init__()
        # `slack` extra slots keep the tokens a rejected draft overwrote (speculative decoding rolls back)
        self.window, self.ring, self.sink, self.bits, self.layer_idx = window, window + slack, sink, bits, layer_idx
        self.capacity = sink + self.ring  # slots [0, sink) hold the sinks, the rest is the ring
        self.storage_names = ("age", "t", "sinks") if sink else ("age", "t")
        self.seen = 0
        self.store: SlotStore | None = None
        self.record = False  # keep the prompt's (q, k, v, valid, scaling) for `CompressedKVCache.replay`
        self.prompt: tuple | None = None

    def allocate(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.store = SlotStore(batch, heads, self.capacity, head_dim, self.bits, dtype, device)
        self.age = torch.full((batch, self.capacity), -1, dtype=torch.int32, device=device)  # -1 = empty slot
        self.t = torch.zeros((), dtype=torch.long, device=device)
        self.sinks = torch.zeros(batch, dtype=torch.int32, device=device)  # sink slots filled per row
        self.keys = self.values = None
        self.is_initialized = True

    def reset(self) -> None:
        self.seen = 0
        if self.store is not None:
            self.t.zero_()
            self.age.fill_(-1)
            self.sinks.zero_()

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
        """Keep each row's first `sink` real tokens in the sink slots and the prompt's last tokens in the ring
        (padding, and a sink already kept, stay empty ring slots)."""
        b, h, s, _ = key.shape
        if valid is None:
            valid = torch.ones(b, s, dtype=torch.bool, device=key.device)
        self.age.fill_(-1)
        self.store.set_key_scale(key, valid)
        is_sink = valid & (valid.cumsum(1) <= self.sink)
        if self.sink:
            self._fill_sinks(key, value, valid)
        n = min(s, self.ring)
        positions = torch.arange(s - n, s, device=key.device)
        slots = self.sink + positions % self.ring
        self.store.write(slots.expand(b, h, n), key[:, :, s - n:], value[:, :, s - n:])
        kept = valid[:, s - n:] & ~is_sink[:, s - n:]
        self.age[:, slots] = torch.where(kept, positions, -1).to(torch.int32)
        self.t.fill_(s)

    def _fill_sinks(self, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor) -> None:
        b, h, s, d = key.shape
        rank = valid.cumsum(1)
        wanted = torch.arange(1, self.sink + 1, device=key.device)
        match = (rank[:, None, :] == wanted[None, :, None]) & valid[:, None, :]  # [B, sink, S]
        found, position = match.any(-1), match.int().argmax(-1)  # [B, sink]
        index = position[:, None, :, None].expand(b, h, self.sink, d)
        slots = torch.arange(self.sink, device=key.device).expand(b, h, self.sink)
        self.store.write(slots, key.gather(2, index), value.gather(2, index))
        self.age[:, :self.sink] = torch.where(found, position, -1).to(torch.int32)
        self.sinks.copy_(found.sum(1))

    is_croppable = True

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' convention for static layers: `crop(-n)` forgets the last n tokens (a rejected draft);
        their slots are overwritten next and masked until then."""
        if tokens_to_remove > 0 or -tokens_to_remove > self.ring - self.window:
            raise RuntimeError(f"ring layer: cannot roll back {-tokens_to_remove} tokens with "
                               f"{self.ring - self.window} slack slots")
        self.t.sub_(-tokens_to_remove)
        self.seen += tokens_to_remove
        if self.sink:  # a rolled-back token that had become a sink (a prompt shorter than `sink`) is forgotten
            stale = self.age[:, :self.sink] >= self.t.to(torch.int32)
            self.age[:, :self.sink].masked_fill_(stale, -1)
            self.sinks.sub_(stale.sum(1).to(torch.int32))

    def decode(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                softcap: float | None) -> torch.Tensor:
        """Write the new token over the oldest ring slot (or into the next sink slot while a row has fewer than
        `sink` tokens), then attend over the sinks and the window. [B, Hq, 1, D]"""
        b, h, _, _ = key.shape
        now = self._write(key, value)
        valid = self._exact(now)[:, None, None, :]  # [B, 1, 1, C]
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

    def _slot(self) -> torch.Tensor:
        """[B] the ring slot the next token goes to (before any sink redirection)."""
        return (self.sink + self.t % self.ring).view(1).expand(self.age.shape[0])

    def _write(self, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Store one token (the next sink slot while a row has fewer than `sink` tokens, else its ring slot);
        returns its position (int32 scalar tensor). `t` is advanced by the caller, after it attended."""
        b, h, _, _ = key.shape
        now = self.t.to(torch.int32)
        slot = self._slot()
        if self.sink:
            to_sink = self.sinks < self.sink
            slot = torch.where(to_sink, self.sinks.clamp_max(self.sink - 1).long(), slot)
            self.sinks.add_(to_sink.to(torch.int32))
        self.store.write(slot.view(b, 1, 1).expand(b, h, 1), key, value)
        self.age.scatter_(1, slot.view(b, 1), now.expand(b, 1))
        return now

    def _exact(self, now: torch.Tensor) -> torch.Tensor:
        """[B, C] slots attended exactly at position `now`: sinks and the last `window` positions up to now (slots
        ahead of now are a rolled-back draft's)."""
        recent = (self.age > now - self.window) | (torch.arange(self.capacity, device=self.age.device) < self.sink)
        return (self.age >= 0) & recent & (self.age <= now)
