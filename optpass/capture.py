"""Capture: model + example inputs -> `ModelGraph` (an FX graph and its indexed sites).

First choice is `torch.export.export(strict=False)` with symbolic batch / sequence dims: its IR
keeps `aten.linear` and `aten.scaled_dot_product_attention` and records `nn_module_stack`. If the
dynamic export fails we retry with static shapes, then fall back to a dynamo graph; every step that
did not work is recorded in `ModelGraph.notes`, so the report can say why.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim

from optpass.adapters import Batch, ModelAdapter, adapter_for
from optpass.errors import CaptureError, UnsupportedModelError
from optpass.indexing import index_graph
from optpass.sites import ModelGraph

_DIM_LIMITS = {"B": (1, 1024), "S": (2, 1 << 17)}


def _dynamic_shapes(adapter: ModelAdapter, batch: Batch, kwargs: dict[str, Any], model: nn.Module) -> dict[str, Any] | None:
    dims = adapter.dynamic_dims(batch)
    if not dims:
        return None
    limits = dict(_DIM_LIMITS)
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and positions >= 2:  # learned position tables bound the sequence (BERT: 512)
        limits["S"] = (2, min(limits["S"][1], positions))
    made: dict[str, Dim] = {}
    spec: dict[str, Any] = {}
    for name in kwargs:
        spec[name] = None
        if name in dims:
            spec[name] = {i: made.setdefault(d, Dim(d, min=limits[d][0], max=limits[d][1])) for i, d in dims[name].items()}
    return spec


def _symbol_names(gm: fx.GraphModule, batch: Batch, adapter: ModelAdapter) -> dict[str, str]:
    """Map symbolic sizes in the graph (s0, s72, ...) back to the B / S names they were declared as."""
    names: dict[str, str] = {}
    dims = adapter.dynamic_dims(batch)
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    for arg, spec in dims.items():
        node = placeholders.get(arg)
        val = node.meta.get("val") if node is not None else None
        if val is None:
            continue
        for i, label in spec.items():
            sym = str(val.shape[i])
            if not sym.isdigit():
                names[sym] = label
    return names


def _export(model: nn.Module, batch: Batch, adapter: ModelAdapter, dynamic: bool) -> fx.GraphModule:
    kwargs = {**(batch.kwargs or {}), **adapter.capture_kwargs(batch)}
    shapes = _dynamic_shapes(adapter, batch, kwargs, model) if dynamic else None
    if shapes is not None and batch.args:
        shapes = None  # positional args with dims: keep it simple, export statically
    ep = torch.export.export(model, tuple(batch.args), kwargs, strict=False, dynamic_shapes=shapes)
    return ep.module()  # unlifted: parameters are attributes, so the graph runs with the user's inputs


def _dynamo_graph(model: nn.Module, batch: Batch, adapter: ModelAdapter) -> fx.GraphModule:
    """Capture with dynamo, tolerating graph breaks: the largest captured graph is indexed."""
    graphs: list[fx.GraphModule] = []

    def grab(gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append(gm)
        return gm.forward

    kwargs = {**(batch.kwargs or {}), **adapter.capture_kwargs(batch)}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=grab, dynamic=False)
    with torch.no_grad():
        compiled(*batch.args, **kwargs)
    torch._dynamo.reset()
    if not graphs:
        raise CaptureError(f"{type(model).__name__}: dynamo captured no graph")
    merged = max(graphs, key=lambda g: len(g.graph.nodes))
    if len(graphs) > 1:
        merged.meta["optpass_graph_breaks"] = len(graphs) - 1
    return merged


def capture(
    model: nn.Module,
    example_inputs: tuple[Any, ...] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    dynamic: bool = True,
) -> ModelGraph:
    """Capture `model` into a `ModelGraph`; inputs default to what the model's adapter can build."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"capture() needs a torch.nn.Module, got {type(model).__name__}")
    adapter = adapter_for(model)
    if example_inputs is None and example_kwargs is None:
        batch = adapter.example_batch(model)
    else:
        batch = Batch(args=tuple(example_inputs or ()), kwargs=dict(example_kwargs or {}))

    notes: list[str] = []
    gm: fx.GraphModule | None = None
    method = "export"
    attempts = [("export (symbolic B, S)", True), ("export (static shapes)", False)] if dynamic else [("export (static shapes)", False)]
    with torch.no_grad():
        for label, dyn in attempts:
            try:
                gm = _export(model, batch, adapter, dyn)
                break
            except Exception as e:  # noqa: BLE001 - any export failure is a reason to fall back
                notes.append(f"{label} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if gm is None:
        method = "dynamo"
        try:
            gm = _dynamo_graph(model, batch, adapter)
        except Exception as e:  # noqa: BLE001
            raise CaptureError(
                f"{type(model).__name__}: could not capture the model ({'; '.join(notes)}; dynamo: {e})"
            ) from e
        if gm.meta.get("optpass_graph_breaks"):
            notes.append(f"dynamo graph breaks: {gm.meta['optpass_graph_breaks']} (indexed the largest graph)")

    graph = ModelGraph(graph_module=gm, method=method, notes=notes, model_kind=adapter.kind, model_class=type(model).__name__)
    graph.symbols = _symbol_names(gm, batch, adapter) if method == "export" else {}
    graph.num_params = sum(p.numel() for p in model.parameters())
    graph.param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    graph.example_shapes = {k: tuple(v.shape) for k, v in (batch.kwargs or {}).items() if isinstance(v, torch.Tensor)}
    index_graph(model, gm, graph)
    return graph
