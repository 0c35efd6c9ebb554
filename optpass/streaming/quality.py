"""The quality guard's causal-LM metrics, after the fact: from logits the block-by-block run already has, and
(when the fp32 model fits) from the written checkpoint loaded back with `optpass.load`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from optpass.progress import status
from optpass.streaming.memory import available_memory, gib


def absolute(logits: list[torch.Tensor], ids: list[torch.Tensor]) -> dict[str, float]:
    """Perplexity over the batches (geometric mean of each batch's), as `QualityGuard._absolute` computes it."""
    from optpass.metrics import perplexity

    ppls = torch.tensor([perplexity(o, i) for o, i in zip(logits, ids)])
    return {"perplexity": float(ppls.log().mean().exp())}


def metrics(ref: list[torch.Tensor], new: list[torch.Tensor], ids: list[torch.Tensor],
            reference: dict[str, float]) -> dict[str, float]:
    """The quality guard's causal-LM metrics (`QualityGuard.evaluate`) from logits already computed."""
    from optpass.metrics import logits_kl, top1_agreement

    out = {"finite": float(all(bool(torch.isfinite(n).all()) for n in new)),
           "kl": sum(logits_kl(r, n) for r, n in zip(ref, new)) / len(ref),
           "top1": sum(top1_agreement(r, n) for r, n in zip(ref, new)) / len(ref)}
    out["perplexity"] = absolute(new, ids)["perplexity"]
    out["ppl_increase"] = out["perplexity"] / reference["perplexity"] - 1
    return out


def check_loaded(out: Path, verify: list[torch.Tensor], q_logits: list[torch.Tensor], ref_logits: list[torch.Tensor],
                 reference: dict[str, float], fp32_bytes: int, artifact_bytes: int,
                 check: bool | None) -> dict[str, Any]:
    """Load the written checkpoint and score its own logits, when asked or (None) when it fits: `optpass.load`
    builds the fp32 architecture first, so this needs about the fp32 size in memory."""
    need, free = int(1.2 * fp32_bytes) + artifact_bytes, available_memory()
    if check is False or (check is None and need > free):
        why = "not asked" if check is False else f"it needs ~{gib(need)} (load builds the fp32 model), {gib(free)} free"
        return {"checked": False, "note": f"the written checkpoint was not loaded back ({why}); quality is the "
                                          "block-by-block measurement"}
    from optpass.checkpoint import load

    with status(f"loading {out} to check it end to end"):
        model = load(out)
        with torch.no_grad():
            logits = [model(input_ids=ids, use_cache=False).logits for ids in verify]
    diff = max(float((a - b).abs().max()) for a, b in zip(logits, q_logits))
    del model
    return {"checked": True, "max_abs_diff": diff, "quality": metrics(ref_logits, logits, verify, reference),
            "note": f"quality measured end to end on the loaded checkpoint (optpass.load; its logits differ from "
                    f"the block-by-block ones by at most {diff:.2e})"}


