"""The FX-graph form of weight quantization: `linear(x, W[N, K], b)` -> `call_module(Int8Linear | Int4Linear)`.

Used by `QuantizePass.rewrite_graph` (the `torch.compile` backend). The quantized module is attached to the
graph module, so Inductor traces its kernels (the C++ GEMV, tinygemm) like any other call. Only linears whose
weight is a constant of the graph are rewritten: a `get_attr` parameter, or a dynamo placeholder whose real
tensor the caller put in `node.meta["optpass_value"]` (dynamo lifts parameters to graph inputs). A linear
whose weight is computed (e.g. the dequantize-then-GEMM path of an already quantized module) is left alone,
so a model optimized by `optimize()` is never quantized twice.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from optpass.backends.cpu.quant_linear import Int4Linear, Int8Linear, int4_supported
from optpass.backends.quant_format import pack_int4, quantize_int4, quantize_int8
from optpass.indexing import LINEAR_TARGETS, VALUE_META, module_stack
from optpass.pass_base import Candidate


def constant_value(node: Any, gm: fx.GraphModule) -> torch.Tensor | None:
    """The tensor behind a graph constant (get_attr, or a placeholder with a recorded value), else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        try:
            return gm.get_parameter(node.target)
        except AttributeError:
            try:
                return gm.get_buffer(node.target)
            except AttributeError:
                return None
    if node.op == "placeholder":
        value = node.meta.get(VALUE_META)
        return value if isinstance(value, torch.Tensor) else None
    return None


def linear_path(node: fx.Node) -> str:
    """The module path a linear call came from (dynamo / export record it), else the node name."""
    stack = module_stack(node)
    return stack[-1] if stack else node.name


def quantized_module(weight: torch.Tensor, bias: torch.Tensor | None, params: dict[str, Any]) -> nn.Module:
    w = weight.detach().float()
    b = bias.detach().float() if bias is not None else None
    if params["scheme"] == "int8":
        q, scale = quantize_int8(w, params.get("group_size"))
        return Int8Linear(q, scale, b, w8a8_min_rows=params.get("w8a8_min_rows"))
    gs = params["group_size"]
    q, scale, zero = quantize_int4(w, gs)
    return Int4Linear(pack_int4(q), scale, zero, gs, b)


def _declare_sources(gm: fx.GraphModule, attr: str) -> None:
    """Dynamo graphs map every parameter / buffer to where it came from (AOT autograd asserts it); the
    quantized tensors are new constants owned by the graph module, so give them constant sources."""
    table = getattr(gm, "_param_name_to_source", None)
    if table is None:
        return
    from torch._dynamo.source import ConstantSource

    module = gm.get_submodule(attr)
    for name, _ in [*module.named_parameters(), *module.named_buffers()]:
        table[f"{attr}.{name}"] = ConstantSource(f"optpass_{attr}_{name.replace('.', '_')}")


def quantize_linear_calls(gm: fx.GraphModule, chosen: list[Candidate]) -> tuple[list[str], dict[str, str]]:
    """Rewrite the linear calls at the candidates' sites; returns (rewritten paths, skipped path -> reason)."""
    by_path = {site: cand for cand in chosen for site in cand.sites}
    done: list[str] = []
    skipped: dict[str, str] = {}
    modules: dict[str, str] = {}  # path -> attribute name (a module called twice shares one quantized copy)
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            continue
        path = linear_path(node)
        cand = by_path.get(path)
        if cand is None:
            continue
        x, w_node = node.args[0], node.args[1]
        b_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        weight = constant_value(w_node, gm)
        bias = constant_value(b_node, gm) if b_node is not None else None
        if weight is None or weight.dim() != 2 or not weight.is_floating_point() or (b_node is not None and bias is None):
            skipped[path] = "weight or bias is computed in the graph, not a constant"
            continue
        gs = cand.params.get("group_size")
        if cand.params["scheme"] == "int4" and (why := int4_supported(weight.shape[1], weight.shape[0], gs)):
            skipped[path] = why
            continue
        if gs and weight.shape[1] % gs:
            skipped[path] = f"in_features {weight.shape[1]} is not divisible by group_size {gs}"
            skipped[path] = why
            continue
        if path not in modules:
            attr = f"optpass_q{len(modules)}"
            gm.add_submodule(attr, quantized_module(weight, bias, cand.params).to(weight.device))
            _declare_sources(gm, attr)
            modules[path] = attr
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(modules[path], (x,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        done.append(path)
    gm.graph.lint()
    gm.recompile()
    return done, skipped
