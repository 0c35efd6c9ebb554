"""`torch.compile(model, backend="optpass", options={"target": "cpu"})`: graph rewrites, then Inductor.

Dynamo hands each captured FX graph to `optpass_backend`. It indexes the graph's linear calls into a
`ModelGraph`, asks every pass that has a graph form (`Pass.rewrite_graph`) for candidates, lets the cost
model choose (`select(path="graph")`), rewrites, records what it did in a `BackendReport`, and hands the
graph to Inductor's `compile_fx` (C++ on CPU, Triton on GPU). Stateful passes (KV policies, caching,
fast decode) are reached through `optimize()`; a model that `optimize()` already quantized compiles here
without being quantized again (its linears reach dynamo as quantized kernels, not `linear` calls).

Options (all optional): `target` ("cpu"), `passes` ("auto": every pass with a graph form, gated by the cost
model; or a list of names, applied whenever viable), `quantize` (QuantizeConfig fields; default int8 blocks,
float LM head, since there is no quality guard on this path), `inductor` (False: run the rewritten graph
eagerly), `inductor_config` (Inductor config patches). Weights are read once at compile time, as
Inductor's freezing does: updating a parameter afterwards needs `torch._dynamo.reset()`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import fx, nn

from optpass.errors import ConfigError, OptpassError
from optpass.indexing import VALUE_META, index_graph
from optpass.pass_base import Pass
from optpass.sites import ModelGraph

QUANTIZED_KERNELS = ("gemv_int8", "_weight_int8pack_mm", "_weight_int4pack_mm", "int8_weight_only_linear",
                     "int4_weight_only_linear", "_int_mm")
DEFAULT_QUANTIZE = {"weights": "int8", "lm_head": "keep", "fast_decode": False}


@dataclass
class BackendReport:
    """What the backend did to one dynamo graph: the passes (applied or why not) and the linears it saw."""

    target: str
    graph: int  # 0, 1, ... per backend call (one per compiled graph / recompile)
    linear_calls: int = 0
    already_quantized: int = 0
    passes: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def applied(self) -> list[str]:
        return [p["name"] for p in self.passes if p["status"] == "applied"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"optpass backend, graph {self.graph} -> {self.target}: {self.linear_calls} float linear calls, "
                 f"{self.already_quantized} already-quantized kernels"]
        lines += [f"  {p['name']}: {p['status']} ({len(p['sites'])} sites) {p['reason']}" for p in self.passes]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


REPORTS: list[BackendReport] = []  # every graph the name-registered backend compiled, latest last


def last_report() -> BackendReport | None:
    return REPORTS[-1] if REPORTS else None


def _mark_constants(gm: fx.GraphModule, example_inputs: list[Any]) -> None:
    """Dynamo lifts parameters to placeholders; record their real tensors so a rewrite can read them."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if isinstance(value, nn.Parameter):
            node.meta[VALUE_META] = value


def _unmark(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        node.meta.pop(VALUE_META, None)


def graph_sites(gm: fx.GraphModule, example_inputs: list[Any]) -> ModelGraph:
    """A `ModelGraph` of a dynamo graph, indexed by the same `index_graph` as `optimize()`'s captures (blocks
    from the module stacks dynamo records), plus its parameter count and input shapes."""
    from optpass.indexing import linear_operands
    from optpass.passes.quantize_graph import constant_value

    graph = ModelGraph(graph_module=gm, method="dynamo")
    index_graph(None, gm, graph)
    nodes = {n.name: n for n in gm.graph.nodes}
    # only linears over a constant weight can be rewritten here (a computed weight is an already-quantized layer)
    graph.linears = [s for s in graph.linears
                     if (w := constant_value(linear_operands(nodes[s.node])[1], gm)) is not None and w.dim() == 2]
    for node in gm.graph.nodes:
        value = node.meta.get(VALUE_META) if node.op == "placeholder" else None
        if value is not None:
            graph.num_params += value.numel()
            graph.param_bytes += value.numel() * value.element_size()
    inputs = [(n.name, v) for n, v in zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs)
              if isinstance(v, torch.Tensor) and VALUE_META not in n.meta and v.dim() >= 2]
    graph.example_shapes = {name: tuple(v.shape) for name, v in inputs[:1]}
    return graph


def _count_quantized(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and any(k in str(n.target) for k in QUANTIZED_KERNELS))


def graph_passes(passes: Any, quantize: dict[str, Any] | None) -> tuple[list[Pass], bool]:
    """The passes with a graph form, default-configured for this path (see the module docstring)."""
    from optpass.passes.quantize import QuantizeConfig
    from optpass.registry import get_pass, registered_passes

    auto = passes in (None, "auto")
    names = [n for n, cls in sorted(registered_passes().items()) if cls.rewrite_graph is not Pass.rewrite_graph] \
        if auto else ([p.strip() for p in passes.split(",")] if isinstance(passes, str) else list(passes))
    built = []
    for name in names:
        cls = get_pass(name)
        if name == "quantize":
            built.append(cls(QuantizeConfig.from_dict({**DEFAULT_QUANTIZE, **(quantize or {})})))
        else:
            built.append(cls())
    return built, auto


class OptpassBackend:
    """A dynamo backend object (`torch.compile(model, backend=OptpassBackend(target="cpu"))`) that keeps its
    own `reports` and `compiles` count; the name-registered backend uses one per call with shared REPORTS."""

    def __init__(self, target: str = "cpu", passes: Any = "auto", quantize: dict[str, Any] | None = None,
                 inductor: bool = True, inductor_config: dict[str, Any] | None = None) -> None:
        from optpass.cost_models import get_spec

        self.spec = get_spec(target)
        self.passes, self.auto = graph_passes(passes, quantize)
        self.inductor, self.inductor_config = inductor, dict(inductor_config or {})
        self.reports: list[BackendReport] = []
        self.compiles = 0

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        report = BackendReport(self.spec.name, self.compiles)
        self.compiles += 1
        report.already_quantized = _count_quantized(gm)
        if report.already_quantized:
            report.notes.append(f"{report.already_quantized} quantized kernel calls already in the graph "
                                "(optimize() output): those linears are not quantized again")
        _mark_constants(gm, example_inputs)
        try:
            self._rewrite(gm, example_inputs, report)
        finally:
            _unmark(gm)
        self.reports.append(report)
        REPORTS.append(report)
        if not self.inductor:
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches=self.inductor_config or None)

    def _rewrite(self, gm: fx.GraphModule, example_inputs: list[Any], report: BackendReport) -> None:
        from optpass.cost_models import select

        graph = graph_sites(gm, example_inputs)
        report.linear_calls = len(graph.linears)
        for p in self.passes:
            cands = p.candidates(graph, self.spec)
            decisions = select(cands, auto=self.auto, path="graph")
            chosen = [d.candidate for d in decisions if d.chosen]
            if not chosen:
                why = "; ".join(sorted({d.reason for d in decisions})) or "no candidates"
                report.passes.append({"name": p.name, "status": "skipped", "sites": [], "reason": why})
                continue
            try:
                result = p.rewrite_graph(gm, chosen)
            except Exception as e:
                raise OptpassError(f"optpass backend: pass {p.name!r} failed to rewrite the graph: "
                                   f"{type(e).__name__}: {e}") from e
            report.passes.append({"name": p.name, "status": "applied" if result.modified else "skipped",
                                  "sites": list(result.sites), "reason": result.reason,
                                  "details": result.details})
            if result.modified and p.name == "quantize":
                graph = graph_sites(gm, example_inputs)  # later passes see the rewritten linears


def optpass_backend(gm: fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None,
                    **kwargs: Any) -> Callable[..., Any]:
    """The entry point registered as `torch_dynamo_backends: optpass` (torch.compile's `options=` arrive here)."""
    options = dict(options or {})
    allowed = {"target", "passes", "quantize", "inductor", "inductor_config"}
    if set(options) - allowed:
        raise ConfigError(f"optpass backend: unknown options {sorted(set(options) - allowed)}; allowed: {sorted(allowed)}")
    return OptpassBackend(**options)(gm, example_inputs)
