"""Dead-code / no-op removal: eval-mode Dropout modules become Identity; in FX graphs, no-op nodes
(eval dropout, same-dtype casts, aliases, runtime shape asserts) are bypassed and dead nodes erased.

Exact by construction (outputs bit-identical), so it is the pass the framework's own tests lean on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from optpass.cost_models.hardware import HardwareSpec
from optpass.cost_models.model_cost import model_estimate
from optpass.pass_base import ApplyContext, Candidate, Pass, PassConfig, PassResult
from optpass.registry import register_pass
from optpass.sites import ModelGraph

aten = torch.ops.aten


@dataclass(frozen=True)
class DeadCodeConfig(PassConfig):
    dropout: bool = True  # replace eval-mode Dropout modules with Identity
    graph_noops: bool = True  # bypass no-op FX nodes on the graph path


def _noop_input(node: fx.Node) -> fx.Node | None:
    """If `node` returns its first input unchanged, that input; else None."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    if node.target in (aten.alias.default, aten.detach.default):
        return src
    if node.target is aten.dropout.default and not node.args[2]:
        return src
    if node.target is aten.to.dtype:
        before, after = src.meta.get("val"), node.meta.get("val")
        if before is not None and after is not None and before.dtype == after.dtype:
            return src
    return None


def _is_assert(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is aten._assert_tensor_metadata.default


@register_pass
class DeadCodePass(Pass):
    name = "dead_code"
    config_cls = DeadCodeConfig

    def candidates(self, graph: ModelGraph, target: HardwareSpec) -> list[Candidate]:
        found: list[Candidate] = []
        dropouts = tuple(p for p, cls in graph.modules.items() if cls.split(".")[-1].startswith("Dropout"))
        if self.config.dropout:
            est = model_estimate(graph, target, -len(dropouts) * target.launch_floor)
            found.append(Candidate(self.name, dropouts, {"kind": "dropout"}, est, label="eval Dropout -> Identity")
                         if dropouts else Candidate.skip(self.name, (), "no Dropout modules run in this model",
                                                         label="eval Dropout -> Identity"))
        if self.config.graph_noops and graph.graph_module is not None:
            noops = tuple(n.name for n in graph.graph_module.graph.nodes if _noop_input(n) is not None or _is_assert(n))
            if noops:
                est = model_estimate(graph, target, -len(noops) * target.launch_floor)
                found.append(Candidate(self.name, noops, {"kind": "graph_noops"}, est, label="no-op graph nodes",
                                       paths=("graph",)))
        return found

    def apply(self, model: nn.Module, chosen: list[Candidate], context: ApplyContext) -> PassResult:
        paths = [s for c in chosen if c.params.get("kind") == "dropout" for s in c.sites]
        replaced = []
        for path in paths:
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            if isinstance(getattr(parent, attr, None), nn.Dropout):
                setattr(parent, attr, nn.Identity())
                replaced.append(path)
        if not replaced:
            return PassResult(self.name, model, False, reason="no Dropout module to replace on the module path "
                              "(graph no-ops are removed only on the torch.compile / export path)")
        return PassResult(self.name, model, True, tuple(replaced), details={"dropout_replaced": len(replaced)})

    def saved_state(self, model: nn.Module) -> dict[str, Any]:
        """Paths of Identity modules: on the base model these are the Dropouts this pass replaced."""
        return {"identity": [p for p, m in model.named_modules() if isinstance(m, nn.Identity)]}

    def restore(self, model: nn.Module, state: dict[str, Any]) -> nn.Module:
        for path in state.get("identity", []):
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            if isinstance(getattr(parent, attr, None), nn.Dropout):
                setattr(parent, attr, nn.Identity())
        return model

    def rewrite_graph(self, gm: fx.GraphModule, chosen: list[Candidate]) -> PassResult:
        removed = []
        for node in list(gm.graph.nodes):
            src = _noop_input(node)
            if src is not None:
                node.replace_all_uses_with(src)
                gm.graph.erase_node(node)
                removed.append(node.name)
            elif _is_assert(node) and not node.users:
                gm.graph.erase_node(node)
                removed.append(node.name)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        return PassResult(self.name, gm, bool(removed), tuple(removed), reason="" if removed else "no no-op nodes")
