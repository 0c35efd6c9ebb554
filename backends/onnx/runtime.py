"""A small ONNX Runtime runner for graphs written by `export_onnx`: prefill logits and greedy decoding that
feeds each step's present K/V back as the next step's past (the KV cache lives in ORT's output tensors)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from optpass.backends.onnx.decoder import DecoderSpec
from optpass.backends.onnx.export import load_spec


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """CPU session: full graph optimizations; `threads` intra-op threads (None: torch's thread count)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return options


class OrtCausalLM:
    """Drives an exported decode graph: `logits(ids)` and `generate(ids, max_new_tokens)` (greedy)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, spec: DecoderSpec | None = None) -> None:
        self.path = Path(path)
        self.spec = spec or load_spec(path)
        self.session = ort.InferenceSession(str(self.path), session_options(threads), providers=["CPUExecutionProvider"])
        self.past_names = self.spec.input_names()[1:]
        self.output_names = self.spec.output_names()

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        shape = (batch, self.spec.num_kv_heads, 0, self.spec.head_dim)
        return {name: np.zeros(shape, np.float32) for name in self.past_names}

    def step(self, ids: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One forward over `ids` [B, S] after the cached positions -> (logits [B, S, V], new past)."""
        outputs = self.session.run(self.output_names, {"input_ids": ids, **past})
        return outputs[0], dict(zip(self.past_names, outputs[1:]))

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Full-sequence logits [B, S, V] (a prefill from an empty cache)."""
        out, _ = self.step(ids.numpy().astype(np.int64), self._empty_past(ids.shape[0]))
        return torch.from_numpy(out)

    def stepwise_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [S, V] of `ids` [1, S] fed one token per step through the cache, as `generate` runs."""
        past, steps = self._empty_past(1), []
        for t in range(ids.shape[1]):
            out, past = self.step(ids[:, t:t + 1].numpy().astype(np.int64), past)
            steps.append(out[0, -1])
        return torch.from_numpy(np.stack(steps))

    def generate(self, ids: torch.Tensor, max_new_tokens: int, min_new_tokens: int | None = None,
                 eos_token_id: int | list[int] | None = None) -> torch.Tensor:
        """Greedy decoding: prefill once, then one token per step against the cache. Returns [B, S + new]."""
        eos = eos_token_id if eos_token_id is not None else self.spec.eos_token_id
        stop = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        min_new = max_new_tokens if min_new_tokens is None else min_new_tokens
        tokens = ids.numpy().astype(np.int64)
        logits, past = self.step(tokens, self._empty_past(tokens.shape[0]))
        out = [tokens]
        for i in range(max_new_tokens):
            last = logits[:, -1].copy()
            if i < min_new and stop:
                last[:, sorted(stop)] = -np.inf
            nxt = last.argmax(-1).astype(np.int64)[:, None]
            out.append(nxt)
            if i + 1 == max_new_tokens or (tokens.shape[0] == 1 and int(nxt[0, 0]) in stop):
                break
            logits, past = self.step(nxt, past)
        return torch.from_numpy(np.concatenate(out, axis=1))
