"""Quality of a rewritten ONNX graph against the original, both run in ONNX Runtime on the same feeds.

Feeds: token windows for an LM graph (`input_ids` [+ empty `past_*` caches]), else seeded random tensors with
symbolic dims set to 1 (`past`-named dims to 0). Metrics are `optpass.quality`'s: KL / top-1 / perplexity
for logits, relative L2 / PSNR for other outputs; `QualityBudget.violations` decides, as on the FX path.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort
import torch

from optpass.backends.onnx.runtime import session_options
from optpass.quality import logits_kl, perplexity, psnr, rel_l2, top1_agreement

Feeds = dict[str, np.ndarray]
_NP = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float16)": np.float16,
       "tensor(bool)": np.bool_}


def _dims(shape: Sequence[int | str | None], past_len: int) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else (past_len if d and "past" in str(d) else 1) for d in shape)


def default_feeds(session: ort.InferenceSession, tokens: torch.Tensor | None = None, count: int = 2, seq: int = 64,
                  seed: int = 0) -> tuple[list[Feeds], str]:
    """Feeds for `session` and a note saying what they are. `tokens` [n, S]: real token windows for an LM."""
    rng = np.random.default_rng(seed)
    inputs = session.get_inputs()
    names = [i.name for i in inputs]
    if "input_ids" in names:
        if tokens is None:
            vocab = session.get_outputs()[0].shape[-1]
            vocab = vocab if isinstance(vocab, int) else 1000
            tokens = torch.from_numpy(rng.integers(0, vocab, size=(count, seq)))
            note = f"{count} random token windows of {seq} (pass tokens= real text for a meaningful perplexity)"
        else:
            note = f"{tokens.shape[0]} token windows of {tokens.shape[1]}"
        feeds = []
        for row in tokens:
            feed = {"input_ids": row[None].numpy().astype(np.int64)}
            for i in inputs:
                if i.name != "input_ids":
                    feed[i.name] = np.zeros(_dims(i.shape, 0), _NP.get(i.type, np.float32))
            feeds.append(feed)
        return feeds, note
    feeds = []
    for _ in range(count):
        feed = {}
        for i in inputs:
            dtype = _NP.get(i.type, np.float32)
            shape = _dims(i.shape, 0)
            feed[i.name] = (rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                            else rng.integers(0, 2, size=shape).astype(dtype))
        feeds.append(feed)
    return feeds, f"{count} seeded random feeds (symbolic dims = 1)"


def open_session(path: str | os.PathLike, threads: int | None = None) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def first_outputs(session: ort.InferenceSession, feeds: list[Feeds]) -> list[torch.Tensor]:
    name = session.get_outputs()[0].name
    return [torch.from_numpy(session.run([name], f)[0]) for f in feeds]


class OnnxQualityGuard:
    """Reference outputs of the original graph once; metrics of any rewritten graph against them."""

    def __init__(self, reference: ort.InferenceSession, feeds: list[Feeds], is_lm: bool) -> None:
        self.feeds, self.is_lm = feeds, is_lm
        self.reference = first_outputs(reference, feeds)
        self.reference_metrics = self._absolute(self.reference)

    def _absolute(self, outputs: list[torch.Tensor]) -> dict[str, float]:
        if not self.is_lm:
            return {}
        ppl = [perplexity(o, torch.from_numpy(f["input_ids"])) for o, f in zip(outputs, self.feeds)]
        return {"perplexity": float(torch.tensor(ppl).log().mean().exp())}

    def evaluate(self, session: ort.InferenceSession) -> dict[str, float]:
        outputs = first_outputs(session, self.feeds)
        pairs = list(zip(self.reference, outputs))
        metrics = {"finite": float(all(torch.isfinite(o).all() for o in outputs))}
        if self.is_lm:
            metrics["kl"] = sum(logits_kl(r, n) for r, n in pairs) / len(pairs)
            metrics["top1"] = sum(top1_agreement(r, n) for r, n in pairs) / len(pairs)
            metrics["perplexity"] = self._absolute(outputs)["perplexity"]
            metrics["ppl_increase"] = metrics["perplexity"] / self.reference_metrics["perplexity"] - 1
        else:
            metrics["rel_l2"] = max(rel_l2(r, n) for r, n in pairs)
            metrics["psnr"] = min(psnr(r, n) for r, n in pairs)
        return metrics
