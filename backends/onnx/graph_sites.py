"""Sites in an ONNX graph (onnx-ir), as the same `LinearSite` / `AttentionSite` records the FX path indexes,
so ONNX candidates are priced by the same cost model (`cost_models/`).

- linear: MatMul(x, W) with W a constant [K, N] initializer, or MatMul(x, Transpose(W [N, K], perm=[1, 0]))
  (how torch.onnx writes a tied LM head);
- attention: Softmax whose input comes (through Add / Mul / Div / Where) from MatMul(q, k^T) and whose output
  feeds MatMul(p, v); heads from the scores' shape, head dim from q, KV heads from the K projection's width.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from optpass.sites import AttentionSite, LinearSite, ModelGraph

_SCORE_OPS = {"Add", "Mul", "Div", "Where", "Cast"}


@dataclass(frozen=True)
class OnnxLinear:
    """Where a linear's weight lives: the MatMul node, and the initializer in [N, K] or [K, N] form."""

    site: LinearSite
    node: ir.Node
    weight: ir.Value
    transposed: bool  # True: the initializer is [N, K] behind a Transpose node


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _weight_of(node: ir.Node) -> tuple[ir.Value, bool] | None:
    """The constant weight input of a MatMul, and whether it sits behind a [1, 0] Transpose."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    b = node.inputs[1]
    if b is None:
        return None
    if b.const_value is not None and len(b.shape or ()) == 2:
        return b, False
    producer = b.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.inputs[0] is not None:
        src = producer.inputs[0]
        perm = producer.attributes.get("perm")
        if src.const_value is not None and len(src.shape or ()) == 2 and (perm is None or list(perm.as_ints()) == [1, 0]):
            return src, True
    return None


def find_linears(graph: ir.Graph) -> list[OnnxLinear]:
    """Every MatMul with a constant 2-D weight, in graph order; the last one feeding a graph output is the head."""
    found = []
    outputs = {id(v) for v in graph.outputs}
    for node in graph:
        hit = _weight_of(node)
        if hit is None:
            continue
        weight, transposed = hit
        n, k = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
        head = any(id(o) in outputs for o in node.outputs)
        dtype = weight.const_value.dtype.name.lower() if weight.const_value is not None else "float"
        site = LinearSite(weight.name or node.name, node.name, int(k), int(n), "float32" if dtype == "float" else dtype,
                          False, None, head)
        found.append(OnnxLinear(site, node, weight, transposed))
    return found


def _upstream(value: ir.Value, stop: set[int], max_nodes: int = 64) -> ir.Node | None:
    """Breadth-first over producers of `value` to the first node whose id is in `stop` (a projection)."""
    queue, seen = deque([value]), set()
    while queue and len(seen) < max_nodes:
        v = queue.popleft()
        node = v.producer() if v is not None else None
        if node is None or id(node) in seen:
            continue
        if id(node) in stop:
            return node
        seen.add(id(node))
        queue.extend(i for i in node.inputs if i is not None and i.const_value is None)
    return None


def _score_matmul(softmax: ir.Node) -> ir.Node | None:
    value = softmax.inputs[0]
    for _ in range(4):
        node = value.producer() if value is not None else None
        if node is None:
            return None
        if node.op_type == "MatMul":
            return node
        if node.op_type not in _SCORE_OPS:
            return None
        value = next((i for i in node.inputs if i is not None and i.const_value is None and i.producer() is not None
                      and i.producer().op_type in _SCORE_OPS | {"MatMul"}), None)
    return None


def find_attentions(graph: ir.Graph, linears: list[OnnxLinear]) -> list[AttentionSite]:
    """Softmax(q k^T ...) v patterns; a Softmax that does not fit the pattern is simply not a site."""
    by_node = {id(lin.node): lin for lin in linears}
    sites = []
    for node in graph:
        if node.op_type != "Softmax":
            continue
        qk = _score_matmul(node)
        consumers = [use.node for use in node.outputs[0].uses()]
        pv = next((c for c in consumers if c.op_type == "MatMul" and c.inputs[0] is node.outputs[0]), None)
        if qk is None or pv is None or id(qk) in by_node:
            continue
        scores = node.inputs[0].shape
        q = qk.inputs[0].shape
        if scores is None or q is None or len(scores) != 4 or not isinstance(scores[1], int) or not isinstance(q[-1], int):
            continue
        heads, head_dim = scores[1], q[-1]
        k_proj = _upstream(qk.inputs[1], set(by_node))
        v_proj = _upstream(pv.inputs[1], set(by_node))
        kv_heads = by_node[id(k_proj)].site.out_features // head_dim if k_proj is not None else heads
        sites.append(AttentionSite(
            name=node.name, node=node.name, q_shape=tuple(str(d) for d in q), k_shape=tuple(str(d) for d in qk.inputs[1].shape or ()),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, causal=True, has_mask=True, block=len(sites),
            kv_entry=(qk.inputs[1].name or "", pv.inputs[1].name or ""),
            kv_projections=(by_node[id(k_proj)].site.name if k_proj is not None else None,
                            by_node[id(v_proj)].site.name if v_proj is not None else None)))
    return sites


def index_graph(model: ir.Model, example_tokens: int = 64) -> tuple[ModelGraph, list[OnnxLinear]]:
    """A `ModelGraph` for the cost model (no FX graph) plus the ONNX handles of its linears."""
    linears = find_linears(model.graph)
    attentions = find_attentions(model.graph, linears)
    names = [v.name for v in model.graph.inputs]
    kind = "causal_lm" if "input_ids" in names else "generic"
    params = sum(int(np.prod(v.shape.numpy())) for v in model.graph.initializers.values() if v.shape is not None
                 and all(isinstance(d, int) for d in v.shape))
    graph = ModelGraph(None, "onnx", linears=[lin.site for lin in linears], attentions=attentions,
                       model_kind=kind, example_shapes={"input_ids": (1, example_tokens)}, num_params=params,
                       notes=[f"ONNX graph: {len(linears)} MatMul-with-initializer linears, {len(attentions)} attention patterns"])
    return graph, linears
