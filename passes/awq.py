"""Activation-aware weight scaling before int4 quantization (AWQ, Lin et al., MLSys 2024).

For linears sharing an input X [T, K] with weights W [N, K], search alpha in [0, 1] for a per-input-channel
scale s = mean|X|^alpha (normalised), minimising || X W^T - X (Q(W s) / s)^T ||. Salient channels (large
activations) get larger weights before rounding, so they lose less. The scale is folded into the producer of
X so the graph gains no op: an RMSNorm / LayerNorm weight (x * w -> x * w / s), or the output rows of the
linear whose product feeds X (down_proj's input act(gate) * up: up's rows / s). alpha = 0 is plain
quantization, so on the calibration data AWQ is never worse. Groups with no foldable producer (o_proj
after attention) are left as they are and listed in the result.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import fx, nn

from optpass.adapters import Batch
from optpass.backends.quant_format import dequantize_int4, quantize_int4
from optpass.indexing import LINEAR_TARGETS, module_stack
from optpass.sites import ModelGraph

GRID = 20
MAX_TOKENS = 512


_PASS_THROUGH = {"alias", "slice", "view", "reshape", "clone", "contiguous", "_to_copy", "to"}


def _fold_target(node: fx.Node, model: nn.Module) -> tuple[str, str] | None:
    """("norm", path) or ("rows", linear path) if the producer of `node` can absorb a per-channel scale.
    Single-use shape-only ops in between (HF's `logits_to_keep` slice of the LM head input) are looked through."""
    while (node.op == "call_function" and len(node.users) == 1 and isinstance(node.args[0], fx.Node)
           and getattr(node.target, "__name__", "").split(".")[0] in _PASS_THROUGH):
        node = node.args[0]
    if node.op != "call_function" or getattr(node.target, "__name__", "") not in ("mul.Tensor", "mul"):
        return None
    for a, b in (node.args[:2], node.args[1::-1]):
        if isinstance(a, fx.Node) and a.op == "get_attr" and a.target.endswith(".weight"):
            path = a.target.rsplit(".", 1)[0]
            if "Norm" in type(model.get_submodule(path)).__name__:
                return ("norm", path)
        if isinstance(a, fx.Node) and a.op == "call_function" and a.target in LINEAR_TARGETS and len(a.users) == 1:
            return ("rows", module_stack(a)[-1])
    return None


def fold_groups(graph: ModelGraph, model: nn.Module, sites: tuple[str, ...]) -> tuple[list[dict[str, Any]], list[str]]:
    """Linears grouped by shared input, each with its fold target; plus the sites that cannot be scaled."""
    by_input: dict[fx.Node, list[str]] = defaultdict(list)
    wanted = set(sites)
    for node in graph.graph_module.graph.nodes:
        if node.op == "call_function" and node.target in LINEAR_TARGETS and module_stack(node):
            path = module_stack(node)[-1]
            if path in wanted:
                by_input[node.args[0]].append(path)
    groups, unscaled = [], []
    for inp, linears in by_input.items():
        consumers = {module_stack(u)[-1] for u in inp.users if u.op == "call_function" and module_stack(u)}
        # folding 1/s into the producer changes every consumer: all of them must be scaled linears of the group
        target = _fold_target(inp, model) if consumers == set(linears) else None
        if target is None:
            unscaled.extend(linears)
        else:
            groups.append({"linears": linears, "fold": target})
    return groups, unscaled


@torch.no_grad()
def _collect_inputs(model: nn.Module, paths: list[str], calibration: list[Batch]) -> dict[str, torch.Tensor]:
    """The first MAX_TOKENS input rows seen by each listed linear."""
    seen: dict[str, list[torch.Tensor]] = defaultdict(list)
    handles = [model.get_submodule(p).register_forward_pre_hook(
        lambda _m, args, p=p: seen[p].append(args[0].reshape(-1, args[0].shape[-1])[:MAX_TOKENS].float()))
        for p in paths]
    try:
        for batch in calibration:
            batch.run(model)
    finally:
        for h in handles:
            h.remove()
    return {p: torch.cat(v)[:MAX_TOKENS] for p, v in seen.items()}


def _best_scale(x: torch.Tensor, w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, float]:
    """Grid-search alpha; returns the scale s [K] and the chosen alpha."""
    mean_abs = x.abs().mean(0).clamp_min(1e-6)
    reference = x @ w.T
    best, best_err, best_alpha = torch.ones_like(mean_abs), float("inf"), 0.0
    for i in range(GRID + 1):
        alpha = i / GRID
        s = mean_abs.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        q, scale, zero = quantize_int4(w * s, group_size)
        w_eff = dequantize_int4(q, scale, zero, group_size) / s
        err = float((x @ w_eff.T - reference).pow(2).mean())
        if err < best_err:
            best, best_err, best_alpha = s, err, alpha
    return best, best_alpha


@torch.no_grad()
def apply_awq(model: nn.Module, sites: tuple[str, ...], group_size: int, calibration: list[Batch],
              graph: ModelGraph) -> dict[str, Any]:
    """Scale the float weights of `sites` in place (before they are quantized) and fold the inverse scale."""
    groups, unscaled = fold_groups(graph, model, sites)
    inputs = _collect_inputs(model, [g["linears"][0] for g in groups], calibration)
    return {"alphas": scale_groups(model, groups, inputs, group_size), "unscaled": unscaled}


@torch.no_grad()
def scale_groups(model: nn.Module, groups: list[dict[str, Any]], inputs: dict[str, torch.Tensor],
                 group_size: int) -> dict[str, float]:
    """Search each group's scale on its first linear's inputs, scale its weights and fold 1/s into the
    producer; returns alpha per group. Shared by the whole-model pass and the block-by-block streaming path."""
    alphas = {}
    for group in groups:
        linears = [model.get_submodule(p) for p in group["linears"]]
        w = torch.cat([lin.weight.float() for lin in linears])
        s, alpha = _best_scale(inputs[group["linears"][0]], w, group_size)
        alphas[",".join(group["linears"])] = alpha
        if alpha == 0.0:
            continue
        for lin in linears:  # new tensors: a tied weight (LM head / embedding) must not change in place
            lin.weight = nn.Parameter(lin.weight * s.to(lin.weight.dtype), requires_grad=False)
        kind, path = group["fold"]
        producer = model.get_submodule(path)
        if kind == "norm":
            producer.weight.div_(s.to(producer.weight.dtype))
        else:
            producer.weight = nn.Parameter(producer.weight / s[:, None].to(producer.weight.dtype), requires_grad=False)
            if producer.bias is not None:
                producer.bias.div_(s.to(producer.bias.dtype))
    return alphas
