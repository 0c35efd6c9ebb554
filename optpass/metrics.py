"""Quality metrics of a rewritten model's output against the reference's, on the positions users read.

Every metric takes an optional `mask` [B, S] (True = a real token): padded positions of a batch produce
outputs nobody consumes, and counting them misjudges a rewrite (an int8 sentence encoder measured 0.116
relative L2 over all positions of a padded batch but 0.029 on its real tokens). Shapes: logits / hidden
states [B, S, ...]; a mask whose shape does not prefix the output's is ignored (e.g. pooled task logits).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`x` [B, S, ...] -> [N, ...] over the masked-in positions (all of them without a usable mask)."""
    if mask is not None and tuple(mask.shape) == tuple(x.shape[:mask.dim()]) and x.dim() > mask.dim():
        return x[mask.bool()]
    return x.flatten(0, -2) if x.dim() > 1 else x[None]


def logits_kl(ref: torch.Tensor, new: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean over (valid) positions of KL(softmax(ref) || softmax(new)), in nats."""
    ref_lp = F.log_softmax(_rows(ref.float(), mask), dim=-1)
    new_lp = F.log_softmax(_rows(new.float(), mask), dim=-1)
    return float(F.kl_div(new_lp, ref_lp, log_target=True, reduction="batchmean"))


def top1_agreement(ref: torch.Tensor, new: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    return float((_rows(ref, mask).argmax(-1) == _rows(new, mask).argmax(-1)).float().mean())


def perplexity(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """exp(mean next-token cross-entropy) of `logits` [B, S, V] on `ids` [B, S]; with `mask`, only predictions
    of a real token from a real token count."""
    pred, target = logits[:, :-1].float(), ids[:, 1:]
    if mask is not None:
        keep = (mask[:, :-1] & mask[:, 1:]).bool()
        loss = F.cross_entropy(pred[keep], target[keep], reduction="mean")
    else:
        loss = F.cross_entropy(pred.flatten(0, 1), target.flatten(), reduction="mean")
    return float(torch.exp(loss))


def rel_l2(ref: torch.Tensor, new: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    r, n = _rows(ref.float(), mask), _rows(new.float(), mask)
    return float((n - r).norm() / r.norm().clamp_min(1e-12))


def psnr(ref: torch.Tensor, new: torch.Tensor, data_range: float | None = None, mask: torch.Tensor | None = None) -> float:
    """Peak signal-to-noise ratio in dB; the range defaults to the reference's max - min."""
    ref, new = _rows(ref.float(), mask), _rows(new.float(), mask)
    mse = float(((ref - new) ** 2).mean())
    rng = data_range if data_range is not None else float(ref.max() - ref.min())
    return math.inf if mse == 0 else 20 * math.log10(max(rng, 1e-12)) - 10 * math.log10(mse)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sentence embeddings [B, H] from token states [B, S, H]: the mean over real tokens (sentence-transformers'
    default pooling)."""
    if hidden.dim() == 2:  # already one vector per row (a pooler's output)
        return hidden.float()
    if mask is None:
        return hidden.float().mean(1)
    m = mask.to(hidden.dtype)[..., None]
    return (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)


def embedding_cosine(ref: torch.Tensor, new: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """The worst row's cosine similarity between mean-pooled reference and rewritten embeddings."""
    return float(F.cosine_similarity(mean_pool(ref, mask), mean_pool(new, mask), dim=-1).min())
