"""Weight-only quantization of an ONNX graph: MatMul(x, W_init [K, N]) -> com.microsoft::MatMulNBits(x, B, scales
[, zero_points]) with optpass's canonical int4 (group-wise, float zero) / int8 (per channel) recipes, as an
onnx-ir in-place pass. Unused float initializers and Transposes are dropped afterwards, so the file shrinks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
import torch

from optpass.backends.onnx.graph_sites import OnnxLinear, find_linears
from optpass.backends.onnx.matmul_nbits import INPUT_DEFAULT_ACCURACY, NBitsWeight, int8_block, quantize_weight, split_zero

MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class Scheme:
    """bits 4 (block = group size) or 8 (block only repeats the channel scale)."""

    bits: int
    block_size: int = 32

    @property
    def label(self) -> str:
        return f"int4 g{self.block_size}" if self.bits == 4 else "int8"


def unsupported(lin: OnnxLinear, scheme: Scheme) -> str | None:
    """None if MatMulNBits with `scheme` can take this weight exactly, else why not."""
    k = lin.site.in_features
    if lin.weight.const_value is None or lin.weight.const_value.dtype != ir.DataType.FLOAT:
        return "weight is not a float32 initializer"
    if scheme.bits == 4 and k % scheme.block_size:
        return f"K={k} is not divisible by the int4 group size {scheme.block_size}"
    if scheme.bits == 8 and int8_block(k) is None:
        return f"K={k} is not divisible by 16 (int8 MatMulNBits block)"
    return None


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _node(op: str, inputs: list[ir.Value | None], name: str, domain: str = "", **attrs: object) -> ir.Node:
    return ir.Node(domain, op, inputs, attributes=ir.convenience.convert_attributes(attrs), name=name)


def _replace(graph: ir.Graph, lin: OnnxLinear, w: NBitsWeight, accuracy_level: int | None) -> None:
    """MatMul -> MatMulNBits (integer default zero point) [+ the float-zero side term of `split_zero`]."""
    base = (lin.weight.name or lin.node.name).replace("/", "_")
    x, old = lin.node.inputs[0], lin.node
    split, corr = split_zero(w)
    rank = len(x.shape) if x.shape is not None else None
    if corr is not None and rank is None:
        split, corr = w, None  # the side term needs x's rank: keep float zero points (ORT's slower path)
    inputs = [x, _initializer(graph, f"{base}.q{w.bits}", w.packed), _initializer(graph, f"{base}.scales", w.scales)]
    if split.zeros is not None:
        inputs.append(_initializer(graph, f"{base}.zeros", split.zeros))
    nodes = [_node("MatMulNBits", inputs, f"{old.name}_nbits", MS_DOMAIN, K=w.in_features, N=w.out_features,
                   bits=w.bits, block_size=w.block_size,
                   accuracy_level=INPUT_DEFAULT_ACCURACY[w.bits] if accuracy_level is None else accuracy_level)]
    if corr is not None:
        groups = w.in_features // w.block_size
        shape = _initializer(graph, f"{base}.group_shape", np.array([0] * (rank - 1) + [groups, w.block_size], np.int64))
        axes = _initializer(graph, f"{base}.group_axis", np.array([-1], np.int64))
        nodes.append(_node("Reshape", [x, shape], f"{old.name}_groups"))
        nodes.append(_node("ReduceSum", [nodes[-1].outputs[0], axes], f"{old.name}_groupsum", keepdims=0))
        nodes.append(_node("MatMul", [nodes[-1].outputs[0], _initializer(graph, f"{base}.zero_correction", corr)],
                           f"{old.name}_zero_term"))
        nodes.append(_node("Add", [nodes[0].outputs[0], nodes[-1].outputs[0]], f"{old.name}_plus_zero_term"))
    out = nodes[-1].outputs[0]
    out.shape, out.type = old.outputs[0].shape, old.outputs[0].type
    ir.convenience.replace_nodes_and_values(graph, old, [old], nodes, old.outputs, [out])


class QuantizeMatMulPass(ir.passes.InPlacePass):
    """Replace the named linears (`site.name` -> Scheme) with MatMulNBits; others stay float."""

    def __init__(self, plan: dict[str, Scheme], accuracy_level: int | None = None) -> None:
        super().__init__()
        self.plan, self.accuracy_level = plan, accuracy_level
        self.rewritten: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for lin in find_linears(graph):
            scheme = self.plan.get(lin.site.name)
            if scheme is None or unsupported(lin, scheme):
                continue
            array = lin.weight.const_value.numpy()
            weight = torch.tensor(np.ascontiguousarray(array if lin.transposed else array.T))  # a copy: the initializer is read-only
            _replace(graph, lin, quantize_weight(weight, scheme.bits, scheme.block_size), self.accuracy_level)
            self.rewritten.append(lin.site.name)
        if self.rewritten:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=bool(self.rewritten))


def quantize_matmuls(model: ir.Model, plan: dict[str, Scheme], accuracy_level: int | None = None) -> Sequence[str]:
    """Apply `QuantizeMatMulPass` in place; returns the rewritten site names."""
    p = QuantizeMatMulPass(plan, accuracy_level)
    p(model)
    return p.rewritten


def with_accuracy_level(src: str, dst: str, level: int, bits: int | None = None) -> int:
    """Copy of the model at `src` with MatMulNBits' accuracy_level set to `level` (only on `bits`-bit nodes if
    given), written to `dst`: the compute-type trade-off without a re-export. Returns the nodes changed."""
    model = ir.load(src)
    changed = 0
    for node in model.graph:
        if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN and (
                bits is None or node.attributes["bits"].as_int() == bits):
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", level)
            changed += 1
    ir.save(model, dst)
    return changed
