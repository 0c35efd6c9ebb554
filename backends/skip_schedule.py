"""A monotone per-position layer-skip schedule (SkipDecode-style dynamic depth) that never invalidates the KV cache.

Block `l` of the schedule is skipped (the identity on the residual stream) for every token at position
>= `thresholds[l]`. Because the skipped set only grows with position, a token that runs block `l` attends only
to earlier tokens, which ran it too: their keys and values at that layer exist, so nothing is ever recomputed
or filled in. Positions come from the `position_ids` every decoder block receives, so the schedule is the same
on every path (a prefill, transformers' own loop, optpass's decode runtime, a perplexity evaluation) and, with
left padding, per row of a batch.

When every token of a call is past a block's threshold the block is not run at all (that is the compute the
schedule saves); when only some are (a prefill, or a left-padded batch whose rows differ in position) the block
runs and the skipped tokens keep their input (`torch.where`), which computes the same thing. Inside a compiled
decode step, where data-dependent branches are not allowed, the engine forces off, from the rows' positions
(`set_positions`), the blocks every token of the step skips; it keeps a compiled graph per such stage.

The schedule attaches through an instance-level `forward` (as diffusers' hooks do): the block keeps its class,
its parameters' names and its attributes (e.g. Gemma's `attention_type`), so other passes and checkpoints see
the model they expect.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

ATTRIBUTE = "optpass_skip_from"  # on a scheduled block: the first position at which it is skipped


def _scheduled_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """The block's own forward, skipped for the positions at or past its threshold."""
    run = type(self).forward
    if self.forced_skip:  # a compiled decode step whose tokens are all past the threshold (the engine says)
        return hidden_states
    positions = kwargs.get("position_ids")
    if positions is None:  # nothing says where the tokens are: run the block (the model's own behaviour)
        return run(self, hidden_states, *args, **kwargs)
    past = positions >= getattr(self, ATTRIBUTE)  # [1 or B, S]
    if not torch.compiler.is_compiling():
        if bool(past.all()):
            return hidden_states
        if not bool(past.any()):
            return run(self, hidden_states, *args, **kwargs)
    out = run(self, hidden_states, *args, **kwargs)
    tensor = out[0] if isinstance(out, tuple) else out
    mixed = torch.where(past[..., None].expand_as(tensor), hidden_states, tensor)
    return (mixed, *out[1:]) if isinstance(out, tuple) else mixed


def install_schedule(layers: nn.ModuleList, thresholds: Mapping[int, int]) -> Callable[[], None]:
    """Schedule `layers[l]` to be skipped from position `thresholds[l]` on; returns the undo."""
    for index, start in thresholds.items():
        block = layers[index]
        setattr(block, ATTRIBUTE, int(start))
        block.forced_skip = False
        block.forward = types.MethodType(_scheduled_forward, block)

    def undo() -> None:
        for index in thresholds:
            block = layers[index]
            for name in (ATTRIBUTE, "forced_skip", "forward"):
                block.__dict__.pop(name, None)
    return undo


def scheduled(layers: nn.ModuleList) -> dict[int, int]:
    """{block index: first skipped position} of the blocks a schedule is installed on."""
    return {i: int(getattr(b, ATTRIBUTE)) for i, b in enumerate(layers) if hasattr(b, ATTRIBUTE)}


def stage(thresholds: Mapping[int, int], first_position: int) -> int:
    """How many scheduled blocks every token at or past `first_position` skips (the compiled step's key)."""
    return sum(start <= first_position for start in thresholds.values())


def set_positions(layers: nn.ModuleList, first_position: int | None) -> None:
    """Before a compiled step whose tokens are all at or past `first_position`: a block every one of them skips
    is forced off; the others decide per token (None: every block decides from the positions again)."""
    for block in layers:
        if hasattr(block, ATTRIBUTE):
            block.forced_skip = first_position is not None and first_position >= getattr(block, ATTRIBUTE)


def ramp(order: list[int], warmup: int, every: int) -> dict[int, int]:
    """The SkipDecode-style linear ramp: full depth up to `warmup`, then one more block of `order` skipped
    every `every` positions."""
    return {block: warmup + i * every for i, block in enumerate(order)}


def compute_fraction(thresholds: Mapping[int, int], blocks: int, context: int) -> float:
    """Share of block evaluations a `context`-token sequence runs under the schedule (1.0 = full depth)."""
    skipped = sum(max(0, context - start) for start in thresholds.values())
    return 1.0 - skipped / (blocks * context)
