"""Static layer removal (ShortGPT): the decoder blocks that change the residual stream least are replaced by the
identity, as many as the quality budget allows.

A block's influence is 1 - cos(h_in, h_out), averaged over the calibration tokens users read (padding masked
out): a block whose output points where its input did adds little. Blocks are ranked by it, and the pass offers
removing the n least influential for n = `max_removed` down to 1, most aggressive first; the pass manager keeps
the first n within the budget and records every n it tried (the quality-per-removed-blocks curve). The first and
last blocks are never candidates (ShortGPT and every follow-up find them the most influential, and the cache's
length is read from the first layer). A removed block reads no weights and writes no cache: every decode step
and prefill does that much less work; `benchmarks/layer_removal.py` measures the perplexity curve.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optpass.cost_models.hardware import HardwareSpec
from optpass.cost_models.model_cost import baseline_latency, model_estimate
from optpass.errors import ConfigError
from optpass.pass_base import Alternatives, ApplyContext, Candidate, Option, Outcome, Pass, PassConfig, PassResult
from optpass.registry import register_pass
from optpass.sites import ModelGraph


@dataclass(frozen=True)
class LayerSkipConfig(PassConfig):
    max_removed: int = 4  # most blocks the pass offers to remove (tried from this many down to 1)
    blocks: tuple[int, ...] | None = None  # remove exactly these block indices instead of ranking

    def __post_init__(self) -> None:
        if self.max_removed < 1:
            raise ConfigError(f"LayerSkipConfig.max_removed={self.max_removed}: remove at least one block")


class RemovedBlock(nn.Module):
    """A decoder block replaced by the identity on the residual stream (keeps the attributes the model's loop
    reads, e.g. Gemma's `attention_type`)."""

    def __init__(self, index: int, attention_type: str | None = None) -> None:
        super().__init__()
        self.index = index
        if attention_type is not None:
            self.attention_type = attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's list of decoder blocks (`model.model.layers` in transformers' decoder-only LMs)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


@torch.no_grad()
def block_influence(model: nn.Module, batches: list[dict[str, Any]]) -> list[float]:
    """Per block, 1 - cosine(input, output) of its hidden states, mean over unpadded tokens."""
    layers = decoder_layers(model)
    sums = [0.0] * len(layers)
    count = 0
    keep: torch.Tensor | None = None  # the current batch's token mask, read by the hooks

    def hook(index: int):
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # [B, S]
            sums[index] += float(((1 - cos) * keep).sum()) if keep is not None else float((1 - cos).sum())
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            keep = mask.float() if mask is not None else None
            ids = batch["input_ids"]
            count += int(mask.sum()) if mask is not None else ids.numel()
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return [s / max(count, 1) for s in sums]


def remove_blocks(model: nn.Module, indices: list[int]) -> Callable[[], None]:
    """Replace the blocks at `indices` by `RemovedBlock`; returns the undo."""
    layers = decoder_layers(model)
    originals = {i: layers[i] for i in indices}
    for i in indices:
        layers[i] = RemovedBlock(i, getattr(layers[i], "attention_type", None))

    def undo() -> None:
        for i, block in originals.items():
            layers[i] = block
    return undo


def token_batches(calibration: list[Any]) -> list[dict[str, Any]]:
    """The keyword inputs of the calibration batches the pass manager prepared (corpus windows, or the user's
    `calibration_data`) that carry token ids."""
    return [b.kwargs for b in calibration if getattr(b, "kwargs", None) and "input_ids" in b.kwargs]


@register_pass
class LayerSkipPass(Pass):
    name = "layer_skip"
    config_cls = LayerSkipConfig
    runs_after = ("awq", "quantize")  # the quantize sites are the captured graph's (every block)
    needs_calibration = True

    def candidates(self, graph: ModelGraph, target: HardwareSpec) -> list[Candidate]:
        blocks = graph.blocks
        label = f"remove up to {self.config.max_removed} blocks"
        if graph.model_kind != "causal_lm" or len(blocks) < 4:
            return [Candidate.skip(self.name, (), "layer removal needs a causal LM with at least 4 decoder blocks",
                                   label)]
        n = len(self.config.blocks) if self.config.blocks else min(self.config.max_removed, len(blocks) - 2)
        # each block about an equal share of a step (the cost model's per-site sums would say the same for
        # identical blocks); the estimate is for the most aggressive option, the budget decides the rest
        before = baseline_latency(graph, target)
        est = model_estimate(graph, target, d_latency=-before * n / len(blocks))
        return [Candidate(self.name, tuple(b.name for b in blocks), {"blocks": len(blocks)}, est, label=label,
                          paths=("module",))]

    def decisions(self, model: nn.Module, chosen: list[Candidate], context: ApplyContext) -> list[Alternatives] | PassResult:
        layers = decoder_layers(model)
        if layers is None:
            return PassResult(self.name, model, False, reason=f"{type(model).__name__} has no `model.layers` list of "
                              "decoder blocks to remove from")
        cfg = self.config
        if cfg.blocks is not None:
            bad = [i for i in cfg.blocks if not 0 < i < len(layers) - 1]
            if bad:
                raise ConfigError(f"LayerSkipConfig.blocks {bad}: only blocks 1..{len(layers) - 2} can be removed")
            self._influence = None
            orders = [list(cfg.blocks)]
        else:
            batches = token_batches(context.calibration)
            if not batches:
                return PassResult(self.name, model, False, reason="no calibration token ids to rank blocks on")
            influence = block_influence(model, batches)
            self._influence = [round(v, 5) for v in influence]
            ranked = sorted(range(1, len(layers) - 1), key=lambda i: influence[i])
            top = min(cfg.max_removed, len(ranked))
            orders = [sorted(ranked[:n]) for n in range(top, 0, -1)]

        def option(indices: list[int]) -> Option:
            return Option(f"remove {len(indices)}: {indices}", lambda m: remove_blocks(m, indices), value=indices)

        return [Alternatives("removed blocks", [option(o) for o in orders], monotone=True)]

    def finish(self, model: nn.Module, kept: dict[str, Option | None], outcomes: dict[str, list[Outcome]],
               context: ApplyContext) -> PassResult:
        tried = outcomes["removed blocks"]
        details = {"block_influence": self._influence, "tried": [o.to_dict() for o in tried]}
        if kept["removed blocks"] is None:
            return PassResult(self.name, model, False, details=details,
                              reason=f"removing even one block exceeds the quality budget ({tried[-1].why})")
        indices = kept["removed blocks"].value
        details["removed"] = indices
        return PassResult(self.name, model, True, tuple(f"model.layers.{i}" for i in indices), details=details)

    def saved_state(self, model: nn.Module) -> dict[str, Any]:
        layers = decoder_layers(model)
        return {"removed": [i for i, layer in enumerate(layers) if isinstance(layer, RemovedBlock)]}

    def restore(self, model: nn.Module, state: dict[str, Any]) -> nn.Module:
        remove_blocks(model, list(state.get("removed", [])))
        return model
