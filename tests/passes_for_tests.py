"""Throwaway passes the framework tests register: a broken one, an over-budget one, ordering probes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from optpass.pass_base import ApplyContext, Candidate, Pass, PassConfig, PassResult


@dataclass(frozen=True)
class NoiseConfig(PassConfig):
    """Scale of relative Gaussian noise added to every Linear weight (0 = exact)."""

    scale: float = 0.0
    make_nan: bool = False
    crash: bool = False


class _LinearSitesPass(Pass):
    config_cls = NoiseConfig

    def candidates(self, graph, target):
        return [Candidate(self.name, tuple(s.name for s in graph.linears if not s.tied_to), label="all linears")]


class NoisePass(_LinearSitesPass):
    """Perturbs weights: with `make_nan` it breaks the model, with a large `scale` it exceeds the budget."""

    name = "test_noise"

    def apply(self, model: nn.Module, chosen: list[Candidate], context: ApplyContext) -> PassResult:
        if self.config.crash:
            raise RuntimeError("deliberate crash")
        sites = chosen[0].sites
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name in sites:
                w = model.get_submodule(name).weight
                if self.config.make_nan:
                    w.fill_(float("nan"))
                else:
                    w.add_(torch.randn(w.shape, generator=g) * w.std() * self.config.scale)
        return PassResult(self.name, model, True, sites)


def ordering_pass(name: str, requires=(), runs_after=(), conflicts=()) -> type[Pass]:
    """A pass that records its name into `model.optpass_order` so tests can check execution order."""

    class Ordered(_LinearSitesPass):
        def apply(self, model, chosen, context):
            model.optpass_order = [*getattr(model, "optpass_order", []), self.name]
            return PassResult(self.name, model, True, ())

    Ordered.name = name
    Ordered.requires, Ordered.runs_after, Ordered.conflicts = tuple(requires), tuple(runs_after), tuple(conflicts)
    return Ordered
