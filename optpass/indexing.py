"""Walk a captured FX graph (export or dynamo IR) and index its linear, attention and block sites.

Both IRs record `nn_module_stack` per node, so sites are named by the module path in the user's
model. The index is IR-agnostic: it recognises aten ops (export) and torch-level calls (dynamo).
"""

from __future__ import annotations

import re
from collections import defaultdict

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

from optpass.sites import AttentionSite, BlockSite, LinearSite, ModelGraph

aten = torch.ops.aten
LINEAR_TARGETS = {aten.linear.default, F.linear, torch._C._nn.linear}
# addmm(bias, x, W[K, N]): GPT-2-style `Conv1D` layers (weight stored [in, out]); indexed as linears too
ADDMM_TARGETS = {aten.addmm.default, torch.addmm}
SDPA_TARGETS = {aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention}
ADD_TARGETS = {aten.add.Tensor, torch.add, __import__("operator").add}
# Ops that only reshape/replicate K and V between the cache entry and SDPA (GQA repeat_kv, slicing).
_SHAPE_ONLY = {"expand", "reshape", "view", "unsqueeze", "clone", "contiguous", "slice", "_unsafe_view", "alias"}


def _op_name(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def normalize_path(path: str) -> str:
    """Turn dynamo's `L['self'].model.layers[0]` or `L['args'][0].model.layers.0` (the root module's source
    expression, whatever dynamo names it) and export's `model.layers.0` into `model.layers.0`."""
    path = re.sub(r"^L(\[[^\]]*\])+\.?|^L__self__\.?", "", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def module_stack(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [normalize_path(v[0]) for v in stack.values()]


def _shape(node: object) -> tuple[str, ...]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if val is None or not hasattr(val, "shape"):
        return ()
    return tuple(str(d) for d in val.shape)


def _find_blocks(modules: dict[str, str], used_paths: set[str], lists: set[str] | None = None) -> list[tuple[str, str]]:
    """The repeated blocks, as (path, class name): the largest family of numbered siblings `P.0 .. P.n-1`
    (n >= 2) sharing a class, every one of which runs in the graph. `modules` maps paths to class names (from
    the model, or from the graph's module stacks when only a dynamo graph is at hand); `lists`, when known,
    are the paths that are `nn.ModuleList`s, the only parents allowed."""
    families: dict[str, dict[int, str]] = defaultdict(dict)
    for path, cls in modules.items():
        parent, _, last = path.rpartition(".")
        if last.isdigit() and (lists is None or parent in lists):
            families[parent][int(last)] = cls
    best: list[tuple[str, str]] = []
    for parent, members in families.items():
        if len(members) < 2 or sorted(members) != list(range(len(members))) or len(set(members.values())) != 1:
            continue
        named = [(f"{parent}.{i}" if parent else str(i), members[i]) for i in range(len(members))]
        if not all(any(p == name or p.startswith(name + ".") for p in used_paths) for name, _ in named):
            continue
        if len(named) > len(best):
            best = named
    return best


def _block_of(stack: list[str], block_index: dict[str, int]) -> int | None:
    for path in stack:
        if path in block_index:
            return block_index[path]
    return None


def _walk_to_kv_entry(node: fx.Node) -> fx.Node:
    """Step upstream from SDPA's K/V input through shape-only ops (the GQA repeat) to where the cache enters."""
    while isinstance(node, fx.Node) and node.op == "call_function" and _op_name(node) in _SHAPE_ONLY:
        node = node.args[0]
    return node


def _upstream_linear(node: fx.Node, limit: int = 12) -> fx.Node | None:
    """The nearest linear feeding `node` through its first tensor input (K/V projection before RoPE)."""
    for _ in range(limit):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return None
        if node.target in LINEAR_TARGETS:
            return node
        inputs = [a for a in node.all_input_nodes if a.op == "call_function"]
        if not inputs:
            return None
        node = inputs[0]
    return None


# where the compile backend records the real tensor behind a dynamo placeholder lifted from a parameter
VALUE_META = "optpass_value"


def _weight_value(weight: object) -> torch.Tensor | None:
    value = weight.meta.get(VALUE_META) if isinstance(weight, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _weight_shape(weight: object, gm: fx.GraphModule) -> tuple[int, ...] | None:
    if not isinstance(weight, fx.Node):
        return None
    if _weight_value(weight) is not None:
        return tuple(_weight_value(weight).shape)
    if "val" in weight.meta and hasattr(weight.meta["val"], "shape"):
        return tuple(weight.meta["val"].shape)
    if weight.op == "get_attr":
        try:
            return tuple(gm.get_parameter(weight.target).shape)
        except AttributeError:
            return tuple(gm.get_buffer(weight.target).shape)
    return None


def linear_operands(node: fx.Node) -> tuple[object, object, object, bool]:
    """(input, weight, bias, transposed) of a linear-like call: `linear(x, W[N, K], b)` or
    `addmm(b, x, W[K, N])` (transposed=True)."""
    if node.target in ADDMM_TARGETS:
        return node.args[1], node.args[2], node.args[0], True
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return node.args[0], node.args[1], bias, False


def _linear_site(node: fx.Node, model: nn.Module | None, gm: fx.GraphModule, block: int | None,
                 output_nodes: set[fx.Node], ties: dict) -> LinearSite:
    stack = module_stack(node)
    path = stack[-1] if stack else node.name
    _, weight, bias, transposed = linear_operands(node)
    wshape = _weight_shape(weight, gm)
    module = _get(model, path)
    if wshape is None and isinstance(module, nn.Linear):
        wshape = module.weight.shape
    if wshape is not None and transposed:
        wshape = (wshape[1], wshape[0])
    out_f, in_f = (int(wshape[0]), int(wshape[1])) if wshape is not None else (0, 0)
    weight_param = getattr(module, "weight", None) if module is not None else _weight_value(weight)
    dtype = str(weight_param.dtype).replace("torch.", "") if isinstance(weight_param, torch.Tensor) else "unknown"
    feeds_output = any(u in output_nodes for u in _consumers_through_views(node))
    return LinearSite(
        name=path,
        node=node.name,
        in_features=in_f,
        out_features=out_f,
        dtype=dtype,
        has_bias=bias is not None,
        block=block,
        is_output_head=feeds_output and block is None,
        tied_to=ties.get(path + ".weight"),
        layout="conv1d" if transposed else "linear",
    )


# elementwise ops an output head's logits may pass through on the way out (dtype casts, Gemma-2's tanh softcap)
_TO_OUTPUT = _SHAPE_ONLY | {"to", "_to_copy", "float", "div", "mul", "tanh", "truediv"}


def _consumers_through_views(node: fx.Node, depth: int = 8) -> set[fx.Node]:
    seen, frontier = set(), {node}
    for _ in range(depth):
        nxt = set()
        for n in frontier:
            for u in n.users:
                seen.add(u)
                if u.op == "output" or _op_name(u) in _TO_OUTPUT:
                    nxt.add(u)
        frontier = nxt
    return seen


def _is_weight(node: object, gm: fx.GraphModule) -> bool:
    """A 2-D parameter (get_attr) or a placeholder dynamo lifted from one: a layer's weight, not an activation."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "get_attr":
        return len(_weight_shape(node, gm) or ()) == 2
    val = node.meta.get("val") if _weight_value(node) is None else _weight_value(node)
    return node.op == "placeholder" and isinstance(val, torch.nn.Parameter) and val.dim() == 2


def _get(model: nn.Module | None, path: str) -> nn.Module | None:
    if model is None:
        return None
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _tied_parameters(model: nn.Module) -> dict[str, str]:
    """Map each parameter name sharing storage with an earlier one to that earlier name."""
    first: dict[int, str] = {}
    ties: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = p.data_ptr()
        if key in first and first[key] != name:
            ties[name] = first[key]
        else:
            first.setdefault(key, name)
    return ties


SOFTMAX_TARGETS = {aten.softmax.int, aten._softmax.default, F.softmax, torch.softmax}
MATMUL_TARGETS = {aten.matmul.default, torch.matmul, aten.bmm.default}
# ops between q @ k^T and the softmax in an eager attention (scale, softcap, mask), and between it and @ v
_SCORE_OPS = {"mul", "div", "tanh", "add", "truediv", "to", "_to_copy", "float"}
_PROB_OPS = {"to", "_to_copy", "dropout", "type_as", "float", "alias"}


def _eager_attention(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(q, k, v) of an eager attention around the softmax `node` (softmax(q @ k^T * s [+ mask]) @ v, the form
    models with logit softcapping or no SDPA path take), or None if `node` is not one."""
    up = node.args[0] if node.args else None
    while isinstance(up, fx.Node) and up.op == "call_function" and _op_name(up) in _SCORE_OPS:
        up = next((a for a in up.args if isinstance(a, fx.Node) and len(_shape(a)) == 4), None)
    if not (isinstance(up, fx.Node) and up.target in MATMUL_TARGETS and len(_shape(up)) == 4):
        return None
    down, frontier = None, [node]
    for _ in range(4):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u.op == "call_function" and u.target in MATMUL_TARGETS and u.args[0] is n:
                    down = u
                elif u.op == "call_function" and _op_name(u) in _PROB_OPS:
                    nxt.append(u)
        if down is not None or not nxt:
            break
        frontier = nxt
    if down is None:
        return None
    q, kt = up.args[:2]
    k = kt.args[0] if isinstance(kt, fx.Node) and _op_name(kt) in {"transpose", "permute"} else kt
    return q, k, down.args[1]


def _attention_site(node: fx.Node, model: nn.Module | None, block: int | None,
                    qkv: tuple[object, object, object] | None = None) -> AttentionSite:
    stack = module_stack(node)
    path = stack[-1] if stack else node.name
    q, k, v = qkv or node.args[:3]
    q_shape, k_shape = _shape(q), _shape(k)
    k_entry, v_entry = _walk_to_kv_entry(k), _walk_to_kv_entry(v)
    kv_heads = int(_shape(k_entry)[1]) if len(_shape(k_entry)) == 4 and _shape(k_entry)[1].isdigit() else None
    heads = int(q_shape[1]) if len(q_shape) == 4 and q_shape[1].isdigit() else 0
    module = _get(model, path)
    if kv_heads is None or kv_heads > heads:
        kv_heads = heads // max(getattr(module, "num_key_value_groups", 1), 1)
    has_mask = (len(node.args) > 3 and node.args[3] is not None) or node.kwargs.get("attn_mask") is not None
    is_causal = bool(node.kwargs.get("is_causal", node.args[5] if len(node.args) > 5 else False))
    k_lin, v_lin = _upstream_linear(k_entry), _upstream_linear(v_entry)
    return AttentionSite(
        name=path,
        node=node.name,
        q_shape=q_shape,
        k_shape=k_shape,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(q_shape[-1]) if q_shape and q_shape[-1].isdigit() else 0,
        causal=is_causal or bool(getattr(module, "is_causal", False)),
        has_mask=has_mask,
        block=block,
        kv_entry=(getattr(k_entry, "name", str(k_entry)), getattr(v_entry, "name", str(v_entry))),
        kv_projections=tuple(module_stack(n)[-1] if n is not None and module_stack(n) else None for n in (k_lin, v_lin)),
    )


def index_graph(model: nn.Module | None, gm: fx.GraphModule, graph: ModelGraph) -> None:
    """Fill `graph` with the sites of `gm`, a capture of `model`; `model=None` for a graph alone (the
    `torch.compile` backend's dynamo graph, whose module stacks still name every module it ran)."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    for n in nodes:
        for path, cls in (n.meta.get("nn_module_stack") or {}).values():
            graph.modules.setdefault(normalize_path(path), cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls)))
    used_paths = {p for n in nodes for p in module_stack(n)}
    if model is not None:
        named = dict(model.named_modules())
        blocks = _find_blocks({p: type(m).__name__ for p, m in named.items()}, used_paths,
                              {p for p, m in named.items() if isinstance(m, nn.ModuleList)})
    else:
        blocks = _find_blocks(graph.modules, used_paths)
    block_index = {name: i for i, (name, _) in enumerate(blocks)}
    output_nodes = {n for n in gm.graph.nodes if n.op == "output"}
    ties = _tied_parameters(model) if model is not None else {}

    per_block_linears: dict[int, list[str]] = defaultdict(list)
    per_block_attn: dict[int, list[str]] = defaultdict(list)
    residual_adds: dict[int, int] = defaultdict(int)
    node_block: dict[fx.Node, str] = {}
    for node in nodes:
        stack = module_stack(node)
        block = _block_of(stack, block_index)
        node_block[node] = blocks[block][0] if block is not None else "<model>"
        if node.target in LINEAR_TARGETS or (node.target in ADDMM_TARGETS and _is_weight(node.args[2], gm)):
            site = _linear_site(node, model, gm, block, output_nodes, ties)
            graph.linears.append(site)
            if block is not None:
                per_block_linears[block].append(site.name)
        elif node.target in SDPA_TARGETS or (node.target in SOFTMAX_TARGETS and (qkv := _eager_attention(node))):
            site = _attention_site(node, model, block, None if node.target in SDPA_TARGETS else qkv)
            graph.attentions.append(site)
            if block is not None:
                per_block_attn[block].append(site.name)
        elif node.target in ADD_TARGETS and block is not None and stack and stack[-1] == blocks[block][0]:
            a, b = node.args[:2]
            if isinstance(a, fx.Node) and isinstance(b, fx.Node) and _shape(a) == _shape(b) and _shape(a):
                residual_adds[block] += 1

    for i, (name, cls) in enumerate(blocks):
        graph.blocks.append(
            BlockSite(
                name=name,
                index=i,
                cls=cls,
                residual_adds=residual_adds[i],
                linears=tuple(per_block_linears[i]),
                attentions=tuple(per_block_attn[i]),
            )
        )
    graph.block_graph = _block_dataflow(node_block, [b.name for b in graph.blocks])


def _block_dataflow(node_block: dict[fx.Node, str], block_names: list[str]) -> nx.DiGraph:
    """Blocks (and `<model>` glue) as graph nodes, an edge wherever a value flows from one to another."""
    g = nx.DiGraph()
    g.add_nodes_from(block_names)
    for node, owner in node_block.items():
        for src in node.all_input_nodes:
            src_owner = node_block.get(src)
            if src_owner is not None and src_owner != owner and src_owner in g and owner in g:
                g.add_edge(src_owner, owner)
    return g
