"""ONNX: MatMulNBits packing against optpass's quantized linears, export of a quantized LM with a KV cache run in
ONNX Runtime against PyTorch, and optimize() on an ONNX input graph (quantization, rollback, report)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import optpass
from optpass.backends.cpu import gemv_ops
from optpass.backends.cpu.quant_linear import Int4Linear, Int8Linear, QuantizedLinear
from optpass.backends.onnx.export import export_onnx
from optpass.backends.onnx.matmul_nbits import NBitsWeight, dequantize, from_int4, from_int8, split_int8, split_zero
from optpass.backends.onnx.optimize import optimize_onnx
from optpass.backends.onnx.runtime import OrtCausalLM
from optpass.errors import UnknownPassError, UnsupportedModelError
from optpass.passes.quantize import QuantizeConfig
from optpass.quality import stepwise_logits, top1_agreement


@contextlib.contextmanager
def fp32_activations(model: nn.Module) -> Iterator[nn.Module]:
    """PyTorch's packed CPU kernels round activations to bf16; MatMulNBits at accuracy_level 0 keeps fp32.
    The reference for "same numerics" is the same quantized weights with fp32 activations."""
    mods = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    saved = [m.act_dtype for m in mods]
    for m in mods:
        m.act_dtype = torch.float32
    try:
        yield model
    finally:
        for m, dtype in zip(mods, saved):
            m.act_dtype = dtype


def _nbits_session(w: NBitsWeight, with_zeros: bool) -> ort.InferenceSession:
    inits = [numpy_helper.from_array(w.packed, "B"), numpy_helper.from_array(w.scales, "S")]
    inputs = ["A", "B", "S"]
    if with_zeros and w.zeros is not None:
        inits.append(numpy_helper.from_array(w.zeros, "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=w.in_features, N=w.out_features,
                            bits=w.bits, block_size=w.block_size, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, w.in_features])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, w.out_features])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("scheme", ["int4_g32", "int4_g64", "int8"])
def test_matmul_nbits_layout_matches_quantized_linear(scheme: str) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(192, 80, bias=False)
    x = torch.randn(5, 192)
    if scheme == "int8":
        mod = Int8Linear.from_linear(linear, act_dtype=torch.float32)
        w = from_int8(mod.qweight, mod.scale)
    else:
        mod = Int4Linear.from_linear(linear, int(scheme.split("_g")[1]), act_dtype=torch.float32)
        w = from_int4(mod.qweight, mod.scale, mod.zero, mod.group_size)
    # our reading of the layout is the module's own dequantization, exactly
    torch.testing.assert_close(dequantize(w), mod.dequantized_weight(), rtol=0, atol=1e-6)
    expected = x @ mod.dequantized_weight().T
    # ORT's kernel on that layout (float zero points as given) computes the same product
    y = torch.from_numpy(_nbits_session(w, with_zeros=True).run(None, {"A": x.numpy()})[0])
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    # the fast form: integer default zero point + the exact side term groupsum(x) @ C
    split, corr = split_zero(w)
    y = torch.from_numpy(_nbits_session(split, with_zeros=False).run(None, {"A": x.numpy()})[0])
    if corr is not None:
        y = y + x.view(5, -1, w.block_size).sum(-1) @ torch.from_numpy(corr)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    # and the module's own forward (fp32 activations) agrees; int4 decode rows on the packed GEMV read fp16 group
    # scales (relative rounding <= 2^-11), so they agree to 1e-3
    tol = 1e-3 if scheme != "int8" and gemv_ops.packed_available() else 1e-4
    with torch.no_grad():
        torch.testing.assert_close(mod(x), expected, rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def tiny_int4(tmp_path_factory: pytest.TempPathFactory):
    from optpass.models import tiny_llama

    model = optpass.optimize(tiny_llama(), passes=[QuantizeConfig(weights="int4", lm_head="int8", fast_decode=False)])
    path = tmp_path_factory.mktemp("onnx") / "tiny_int4.onnx"
    return model, export_onnx(model, path)


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory: pytest.TempPathFactory):
    from optpass.models import tiny_llama

    model = tiny_llama()
    path = tmp_path_factory.mktemp("onnx") / "tiny_fp32.onnx"
    return model, export_onnx(model, path)


def test_export_quantized_tiny_llama_matches_pytorch(tiny_int4) -> None:
    model, result = tiny_int4
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    int8 = sum(isinstance(m, Int8Linear) for m in quantized)
    # int8 layers export as two int4 nibble halves at accuracy level 0 (see matmul_nbits.split_int8)
    assert len(quantized) == 15 and result.op_counts.get("com.microsoft::MatMulNBits") == len(quantized) + int8
    # plain MatMuls left: q k^T and p v per layer, and each int4 layer's float-zero side term (no float weights)
    assert result.op_counts["MatMul"] == 2 * 2 + sum(isinstance(m, Int4Linear) for m in quantized)
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    lm = OrtCausalLM(result.path, threads=1)
    with torch.no_grad(), fp32_activations(model):
        ref = model(input_ids=ids).logits
    torch.testing.assert_close(lm.logits(ids), ref, rtol=1e-3, atol=1e-3)


def test_kv_cache_decode_equals_full_recompute(tiny_int4) -> None:
    _, result = tiny_int4
    lm = OrtCausalLM(result.path, threads=1)
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    out = lm.generate(prompt, max_new_tokens=12)
    assert out.shape == (1, 22) and torch.equal(out[:, :10], prompt)
    # each cached step's token is the argmax of a cache-free forward over the whole prefix
    full = lm.logits(out[:, :-1])
    assert torch.equal(full[0, 9:].argmax(-1), out[0, 10:])


def test_export_rejects_non_llama(tmp_path) -> None:
    with pytest.raises(UnsupportedModelError, match="not a Llama-family"):
        export_onnx(nn.Sequential(nn.Linear(4, 4)), tmp_path / "x.onnx")


def test_optimize_onnx_input_quantizes_and_reports(tiny_fp32, tmp_path) -> None:
    _, exported = tiny_fp32
    result = optimize_onnx(exported.path, passes=["quantize", "attention"], output=tmp_path / "opt.onnx", threads=1,
                           measure_rounds=2)
    graph = onnx.load(str(result.path))
    nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 15 and result.path.stat().st_size < exported.path.stat().st_size
    report = result.report
    assert report.passes[0].name == "quantize" and report.passes[0].status == "applied"
    assert report.capture["attentions"] == 2 and report.capture["heads (q, kv)"] == [(4, 2)]
    attention = [c for c in report.candidates if c.pass_name == "attention"]
    assert attention and not attention[0].chosen and "no fused" in attention[0].reason
    assert report.memory["optimized_bytes"] < report.memory["baseline_bytes"]
    # the optimized graph still decodes, and agrees with the original on most next-token choices
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(3))
    a = OrtCausalLM(exported.path, threads=1).logits(ids)
    b = OrtCausalLM(result.path, threads=1).logits(ids)
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) >= 0.9
    assert "quantize" in str(report)


def test_optimize_onnx_rolls_back_over_budget(tiny_fp32) -> None:
    """Through the public entry point: optimize("model.onnx") dispatches to optimize_onnx."""
    _, exported = tiny_fp32
    result = optpass.optimize(str(exported.path), target="cpu", passes=["quantize"], quality_budget="kl:1e-12")
    record = result.report.passes[0]
    assert record.status == "rolled_back" and "KL" in record.reason
    assert not [n for n in onnx.load(str(result.path)).graph.node if n.op_type == "MatMulNBits"]


def test_optimize_onnx_unknown_pass(tiny_fp32) -> None:
    with pytest.raises(UnknownPassError, match="quantize"):
        optimize_onnx(tiny_fp32[1].path, passes=["sparsify"])


@pytest.mark.slow
def test_smollm2_int4_export_agrees_with_pytorch(smollm2, tmp_path_factory) -> None:
    from optpass.corpus import token_windows

    model, tok = smollm2
    quantized = optpass.optimize(model, passes=[QuantizeConfig(weights="int4", lm_head="int8", fast_decode=False)])
    result = export_onnx(quantized, tmp_path_factory.mktemp("onnx") / "smollm2_int4.onnx")
    assert result.op_counts["com.microsoft::MatMulNBits"] == 30 * 7 + 2  # int8 head: two nibble halves
    lm = OrtCausalLM(result.path, threads=2)
    # top-1 against the PyTorch model as generation runs it (one token per step through the KV cache); a
    # prefill takes other kernels (bf16 dequantize + GEMM), on which PyTorch agrees with its own decode ~97%.
    # Top-1 on 512 steps moves with near-ties: 0.992 with a float input embedding, 0.986 with lookups of the
    # int8 head's rows, at the same mean |logit difference| (0.055), which is the kernels' agreement
    pairs = [(stepwise_logits(quantized, row[None]), lm.stepwise_logits(row[None])) for row in token_windows(tok, 128, 4)]
    agree = [top1_agreement(a, b) for a, b in pairs]
    assert np.mean(agree) >= 0.98, agree
    assert max(float((a - b).abs().mean()) for a, b in pairs) < 0.08
    # and the prefill graph is the same math as its decode steps
    row = token_windows(tok, 128, 1)[0]
    assert top1_agreement(lm.logits(row[None])[0], lm.stepwise_logits(row[None])) >= 0.99
    prompt = token_windows(tok, 32, 1, offset_windows=8)
    out = lm.generate(prompt, max_new_tokens=16)
    assert torch.equal(lm.logits(out[:, :-1])[0, 31:].argmax(-1), out[0, 32:])


def test_int8_nibble_split_is_exact() -> None:
    torch.manual_seed(0)
    mod = Int8Linear.from_linear(nn.Linear(128, 48, bias=False), act_dtype=torch.float32)
    w = from_int8(mod.qweight, mod.scale)
    high, low, side = split_int8(w)
    torch.testing.assert_close(dequantize(high) + dequantize(low) + torch.from_numpy(side)[:, None],
                               mod.dequantized_weight(), rtol=0, atol=1e-5)
