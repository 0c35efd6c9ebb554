"""One attention layer's compressed cache: `capacity` scored slots (packed) + a full-precision window of the
`window` most recent tokens (KIVI's residual; also the recent tokens every eviction policy protects).

A transformers cache layer: the model calls `update()` with the new keys and values (after its own
projections, norms and RoPE), then its attention function, which optpass registers
(`backends/kv/attention.py`) and which hands the call to `attention()` here. Prefill: the model's own
attention implementation attends exactly over the prompt, then the layer keeps the policy's best `capacity`
older tokens (sinks always, padding never, ties to the older token). Each decode step is static-shape: the
token leaving the window moves into the slot of the lowest-scored non-sink token (evicting it, or merging
it into its nearest neighbour), the new token enters the window, and attention runs over slots + window.
Keys are stored after RoPE, so kept tokens keep their original positions.

Sliding-window layers (Gemma-2/3, Mistral) need no scores: `backends/kv/ring.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from optpass.backends.kv.storage import SlotStore
from optpass.backends.kv.policies.base import KVPolicy

NEG = float("-inf")


class OptpassLayer(CacheLayerMixin):
    """What every optpass cache layer shares: `update()` claims the attention call that follows (the layer
    stores keys and values when it attends), the sizes transformers' masks are built with, a Python token count
    for eager paths (`seen`) and a tensor one (`t`) for compiled steps. Subclasses set `storage_names` and
    implement `allocate`, `prefill` and `decode`; `attention` (shared) routes the prompt to the model's own
    attention and then `prefill`, and each decode token to `decode`."""

    is_compileable = True
    is_sliding = False
    storage_names: tuple[str, ...] = ()
    store: SlotStore | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.allocate(b, h, d, key_states.dtype, key_states.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Hand the new keys / values through unchanged and claim the attention call that follows: the layer
        stores them when it attends (it needs the queries to score them)."""
        from optpass.backends.kv.attention import _claims, claim

        if _claims and not torch.compiler.is_compiling():
            raise RuntimeError("optpass KV cache: the previous layer's attention did not go through optpass's "
                               "attention function; call optpass.backends.kv.enable_compressed_attention(model)")
        if key_states.shape[-1] != value_states.shape[-1]:
            from optpass.errors import UnsupportedModelError

            raise UnsupportedModelError("optpass KV cache: keys and values of different head sizes are not supported")
        claim(self)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """The sizes transformers' 2D padding mask has (prefill masks cover the prompt); decode attention uses
        the layer's own slot validity, not this mask."""
        return self.seen + query_length, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("optpass's KV cache layers do not support beam search")

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                  scaling: float, softcap: float | None,
                  dense: Callable[[], tuple[torch.Tensor, torch.Tensor | None]], **extra: Any
                  ) -> tuple[torch.Tensor, None]:
        """The attention call of this layer, output [B, Q, Hq, D] as transformers' attention functions return it.
        `dense()` runs the model's own implementation on (query, key, value, mask): used for the prompt. `extra`
        goes on to `prefill` / `decode` (a hybrid layer's feature maps)."""
        from optpass.backends.kv.attention import padding_valid

        if self.store is None:
            self.allocate(key.shape[0], key.shape[1], key.shape[3], key.dtype, key.device)
        if not torch.compiler.is_compiling():
            first = self.seen == 0
            self.seen += query.shape[2]
            if first:
                out, weights = dense()
                valid = padding_valid(mask, key.shape[0], key.shape[2])
                self.prefill(query, key, value, valid, scaling, **extra)
                return out, weights
        steps = [self.decode(query[:, :, i:i + 1], key[:, :, i:i + 1], value[:, :, i:i + 1], scaling, softcap, **extra)
                 for i in range(query.shape[2])]
        out = steps[0] if len(steps) == 1 else torch.cat(steps, dim=2)
        return out.transpose(1, 2).contiguous(), None

    def prefill(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor | None,
                scaling: float) -> None:
        """Keep the prompt the model's own attention just attended (`valid` [B, S]: False for padding)."""
        raise NotImplementedError

    def decode(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
               softcap: float | None) -> torch.Tensor:
        """One new token: store it and attend over the layer's slots. [B, Hq, 1, D]"""
        raise NotImplementedError

    def allocate(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the layer allocated (for byte counts and for export, which lifts them to buffers)."""
        assert self.store is not None
        own = {n: getattr(self, n) for n in self.storage_names}
        return {**{f"store_{k}": v for k, v in self.store.tensors().items()}, **own}

    def bind(self, tensors: dict[str, torch.Tensor]) -> None:
        """Point the layer at `tensors` (same names as `tensors()`), e.g. an exported module's buffers."""
        for name, value in tensors.items():
            if name.startswith("store_"):
                setattr(self.store, name[len("store_"):], value)
            else:
                setattr(self, name, value)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values()) if self.store is not None else 0


class CompressedLayer(OptpassLayer):
    storage_names = ("score", "age", "win_keys", "win_values", "win_score", "win_age", "sink_end", "t")

    def __init__(self, capacity: int, window: int, sink: int, bits: int | None, policy: KVPolicy,
                 merge_threshold: float | None = None, layer_idx: int = 0) -> None:
        super().__init__()
        self.capacity, self.window, self.sink, self.bits = capacity, window, sink, bits
        self.layer_idx = layer_idx
        self.policy = policy
        self.merge_threshold = merge_threshold
        self.seen = 0  # tokens processed (python int, eager paths only; the compiled step uses self.t)
        self.store: SlotStore | None = None
        self.record = False  # keep the prompt's (q, k, v, valid) so other budgets can be replayed from it
        self.prompt: tuple | None = None

    def reset(self) -> None:
        self.seen = 0
        if self.store is not None:
            self.t.zero_()
            self.reset_tensors()

    # -- storage ---------------------------------------------------------------------------------------------
    def allocate(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.store = SlotStore(batch, heads, self.capacity, head_dim, self.bits, dtype, device)
        self.score = torch.zeros(batch, heads, self.capacity, dtype=torch.float32, device=device)
        self.age = torch.full((batch, heads, self.capacity), -1, dtype=torch.int32, device=device)  # -1 = empty
        self.win_keys = torch.zeros(batch, heads, self.window, head_dim, dtype=dtype, device=device)
        self.win_values = torch.zeros_like(self.win_keys)
        self.win_score = torch.zeros(batch, heads, self.window, dtype=torch.float32, device=device)
        self.win_age = torch.full((batch, heads, self.window), -1, dtype=torch.int32, device=device)
        self.sink_end = torch.zeros(batch, 1, 1, dtype=torch.int32, device=device)
        self.t = torch.zeros((), dtype=torch.long, device=device)
        self.keys = self.values = None  # HF code checks these; our data lives in the store
        self.is_initialized = True

    def prefill(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor | None,
                scaling: float) -> None:
        """Keep the attended prompt (`valid` [B, S]: False for padding and, in a sliding layer, outside the window)."""
        b, _, s, _ = key.shape
        if valid is None:
            valid = torch.ones(b, s, dtype=torch.bool, device=key.device)
        self._fill(query, key, value, valid, scaling)
        if self.record:
            self.prompt = (query, key, value, valid, scaling)

    def load_prompt(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor,
                    scaling: float) -> None:
        """Compress an already-attended prompt (from a recording layer) without running the model again."""
        if self.store is None:
            self.allocate(key.shape[0], key.shape[1], key.shape[3], key.dtype, key.device)
        self._fill(query, key, value, valid, scaling)
        self.seen = key.shape[2]

    def _fill(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor, scaling: float) -> None:
        """Keep the prompt: the last `window` tokens in the window, the policy's best `capacity` older ones in slots."""
        b, h, s, d = key.shape
        store = self.store
        self.reset_tensors()
        positions = torch.arange(s, device=key.device)
        first_valid = torch.where(valid, positions, s).amin(-1)
        self.sink_end.copy_((first_valid + self.sink).view(b, 1, 1).to(torch.int32))
        store.set_key_scale(key, valid)
        scores = self.policy.prefill_scores(query, key, valid, scaling)  # [B, H, S]

        w0 = max(s - self.window, 0)  # tokens [w0, s) go to the window, at slot index % window
        if w0 < s:
            win_slots = positions[w0:] % self.window
            age = torch.where(valid[:, w0:], positions[w0:], -1).to(torch.int32)[:, None, :].expand(b, h, s - w0)
            self.win_keys[:, :, win_slots] = key[:, :, w0:]
            self.win_values[:, :, win_slots] = value[:, :, w0:]
            self.win_age[:, :, win_slots] = age
            self.win_score[:, :, win_slots] = scores[:, :, w0:]
        if w0 == 0:
            self.t.fill_(s)
            return
        old_age = positions[:w0].expand(b, h, w0)
        rank = scores[:, :, :w0].masked_fill(old_age < self.sink_end, float("inf"))
        rank = rank.masked_fill(~valid[:, None, :w0], NEG)
        order = torch.sort(rank, dim=-1, descending=True, stable=True).indices  # ties: the older token first
        keep = order[..., : self.capacity]
        n = keep.shape[-1]
        kept_valid = rank.gather(-1, keep) > NEG
        gather = keep[..., None].expand(b, h, n, d)
        kept_k, kept_v = key[:, :, :w0].gather(2, gather), value[:, :, :w0].gather(2, gather)
        if self.merge_threshold is not None and w0 > n:
            from optpass.backends.kv.policies.merge import merge_evicted

            dropped = order[..., n:]
            dropped_valid = rank.gather(-1, dropped) > NEG
            kept_k, kept_v = merge_evicted(kept_k, kept_v, kept_valid, key[:, :, :w0], value[:, :, :w0], dropped,
                                           dropped_valid, self.merge_threshold)
        slots = torch.arange(n, device=key.device).expand(b, h, n)
        store.write(slots, kept_k, kept_v)
        self.age[..., :n] = torch.where(kept_valid, keep, -1).to(torch.int32)
        self.score[..., :n] = scores[:, :, :w0].gather(-1, keep).masked_fill(~kept_valid, 0.0)
        self.t.fill_(s)

    def reset_tensors(self) -> None:
        self.age.fill_(-1)
        self.win_age.fill_(-1)
        self.score.zero_()
        self.win_score.zero_()

    def decode(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
               softcap: float | None = None) -> torch.Tensor:
        """One new token per row: move the window's oldest token into the weakest slot, add the new one, attend."""
        store = self.store
        b, h, _, d = key.shape
        slot = (self.t % self.window).view(1)
        leaving_k = self.win_keys.index_select(2, slot)
        leaving_v = self.win_values.index_select(2, slot)
        leaving_age = self.win_age.index_select(2, slot)  # [B, H, 1]
        leaving_score = self.win_score.index_select(2, slot)
        moving = leaving_age >= 0

        protected = (self.age >= 0) & (self.age < self.sink_end)
        rank = self.score.masked_fill(self.age < 0, NEG).masked_fill(protected, float("inf"))
        victim = rank.argmin(-1, keepdim=True)  # ties: lowest slot
        if self.merge_threshold is not None:
            from optpass.backends.kv.policies.merge import merge_victim

            merge_victim(self, victim, moving)
        store.write(victim, leaving_k, leaving_v, where=moving)
        self.age.scatter_(-1, victim, torch.where(moving, leaving_age, self.age.gather(-1, victim)))
        self.score.scatter_(-1, victim, torch.where(moving, leaving_score, self.score.gather(-1, victim)))

        age = self.t.to(torch.int32).expand(b, h, 1)
        self.win_keys.index_copy_(2, slot, key.to(self.win_keys.dtype))
        self.win_values.index_copy_(2, slot, value.to(self.win_values.dtype))
        self.win_age.index_copy_(2, slot, age)
        self.win_score.index_copy_(2, slot, self.policy.insert_score(age))

        out, p_slots, p_win = self._attend_all(query, scaling, softcap)
        if self.policy.accumulates:
            self.score.add_(p_slots)
            self.win_score.add_(p_win)
        self.t.add_(1)
        return out.to(query.dtype)

    def _attend_all(self, query: torch.Tensor, scaling: float,
                    softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention of one query per head over slots + window (logits softcapped as the model does, when it
        does); also each KV head's summed probabilities."""
        b, hq, _, d = query.shape
        h = self.win_keys.shape[1]
        q = query.float().view(b, h, hq // h, d) * scaling
        k_slots = self.store.decode_keys()
        logits = torch.cat([torch.einsum("bhgd,bhcd->bhgc", q, k_slots),
                            torch.einsum("bhgd,bhwd->bhgw", q, self.win_keys.float())], dim=-1)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        empty = torch.cat([self.age < 0, self.win_age < 0], dim=-1)[:, :, None, :]
        probs = logits.masked_fill(empty, NEG).softmax(-1)
        c = self.capacity
        p_slots, p_win = probs[..., :c], probs[..., c:]
        out = torch.einsum("bhgc,bhcd->bhgd", p_slots, self.store.decode_values()) + \
            torch.einsum("bhgw,bhwd->bhgd", p_win, self.win_values.float())
        return out.reshape(b, hq, 1, d), p_slots.sum(2), p_win.sum(2)
