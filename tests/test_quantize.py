from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load, save
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import optpass
from optpass.backends.cpu import gemv_ops, quant_linear
from optpass.backends.cpu.quant_linear import Int4Linear, Int8Linear
from optpass.backends.quant_format import dequantize_int4, pack_int4, quantize_int4, unpack_int4
from optpass.models import tiny_llama
from optpass.passes.quantize import QuantizeConfig, quantized_modules, rebuild_quantized


class OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _ops(module: nn.Module, rows: int) -> set[str]:
    with torch.no_grad(), OpRecorder() as rec:
        module(torch.randn(rows, module.in_features))
    return rec.ops


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(256, 96)


def test_int8_decode_runs_optpass_gemv(linear):
    ops = _ops(Int8Linear.from_linear(linear), rows=1)
    expected = "aten._weight_int8pack_mm"
    if gemv_ops.available():
        expected = "optpass.gemv_int8_packed" if gemv_ops.packed_available() else "optpass.gemv_int8"
    assert expected in ops
    assert not ops & {"aten.mm", "aten.addmm", "aten.linear", "aten.matmul"}


def test_int8_prefill_runs_w8a8_int_mm(linear):
    ops = _ops(Int8Linear.from_linear(linear, w8a8_min_rows=16), rows=64)
    assert "aten._int_mm" in ops and "aten.mm" not in ops
    assert "aten._weight_int8pack_mm" in _ops(Int8Linear.from_linear(linear), rows=12)
    assert "aten.mm" in _ops(Int8Linear.from_linear(linear), rows=64)  # dequantized bf16 GEMM


def test_int4_runs_tinygemm_kernel(linear, monkeypatch):
    """Without the packed GEMV (a CPU without VNNI): tinygemm below 64 rows, the dequantized GEMM from there."""
    monkeypatch.setattr(gemv_ops, "packed_available", lambda: False)
    module = Int4Linear.from_linear(linear, 32)
    assert module.kernel_gemv is None
    assert "aten._weight_int4pack_mm_for_cpu" in _ops(module, rows=1)
    assert "aten._weight_int4pack_mm_for_cpu" in _ops(module, rows=32)  # still faster than the dequant path here
    prefill = _ops(module, rows=64)
    assert "aten._weight_int4pack_mm_for_cpu" not in prefill and "aten.mm" in prefill  # dequantized GEMM
    if gemv_ops.available() and quant_linear.native_bf16():
        assert "optpass.dequant_bf16_" in prefill  # into the reused workspace, not through plain-op temporaries
    else:  # no native bf16 here: an emulated bf16 GEMM is ~5x slower than fp32, so prefill dequantizes to fp32
        assert "optpass.dequant_bf16_" not in prefill
        assert quant_linear.gemm_dtype(torch.bfloat16) == torch.float32
    module.act_dtype = torch.float32  # the fused kernel is bf16-only: fp32 activations dequantize
    assert "aten._weight_int4pack_mm_for_cpu" not in _ops(module, rows=1)


@pytest.mark.skipif(not gemv_ops.packed_available(), reason="the packed GEMV needs AVX-512 VNNI")
def test_int4_decodes_through_the_packed_kernel_and_keeps_no_tinygemm_copy(linear):
    module = Int4Linear.from_linear(linear, 32)
    assert module.kernel_weight is None and module.decode_tensors[0] == "kernel_gemv"
    for rows in (1, 8, 20, 32):  # past 8 rows in passes of 8, each row as the one-row call computes it
        assert "optpass.gemv_int4_packed" in _ops(module, rows=rows)
    x = torch.randn(20, module.in_features)
    with torch.no_grad():
        assert torch.equal(module(x)[13:14], module(x[13:14]))
    prefill = _ops(module, rows=33)  # the dequantized GEMM, not tinygemm
    assert "optpass.gemv_int4_packed" not in prefill and "aten.mm" in prefill


@pytest.mark.skipif(not gemv_ops.packed_available(), reason="the packed GEMV needs AVX-512 VNNI")
@pytest.mark.parametrize("n, k, group", [(96, 256, 32), (50, 640, 64), (33, 512, 256)])
def test_packed_int4_gemv_matches_the_dequantized_product_and_is_row_exact(n, k, group):
    g = torch.Generator().manual_seed(k)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, k // group, generator=g) / 100 + 1e-3
    zero = torch.rand(n, k // group, generator=g) * 15
    nibbles, packed_scale, offset = gemv_ops.pack_int4_rows(q, scale, zero, group)
    assert nibbles.shape == (-(-n // 32), k // 4, 64) and offset.shape == packed_scale.shape == (-(-n // 32), k // group, 32)
    ref_w = (q.double() - zero.double().repeat_interleave(group, 1)) * scale.double().repeat_interleave(group, 1)
    x = torch.randn(8, k, generator=g) * 3
    got = torch.ops.optpass.gemv_int4_packed(x, nibbles, packed_scale, offset, n)
    ref = x.double() @ ref_w.T
    # fp16 scales (relative error <= 2^-11) and int16 activations bound the difference
    torch.testing.assert_close(got.double(), ref, rtol=2e-3, atol=2e-3 * ref.abs().max().item())
    for i in range(8):  # a verify step's row i is the one-row step at that position
        assert torch.equal(got[i:i + 1], torch.ops.optpass.gemv_int4_packed(x[i:i + 1], nibbles, packed_scale, offset, n))
    # the worst case for int32 lanes: every product at its largest, one sign, the largest group
    x = torch.full((1, k), 7.0)
    ones = torch.ones(n, k // group)
    big = gemv_ops.pack_int4_rows(torch.full((n, k), 15, dtype=torch.uint8), ones, torch.zeros(n, k // group), group)
    torch.testing.assert_close(torch.ops.optpass.gemv_int4_packed(x, *big, n), torch.full((1, n), 7.0 * 15 * k),
                               rtol=1e-6, atol=0)


def test_pack_int4_rows_declines_what_the_kernel_cannot_hold():
    q, zero = torch.zeros(64, 64, dtype=torch.uint8), torch.zeros(64, 2)
    assert gemv_ops.pack_int4_rows(q, torch.full((64, 2), 1e-6), zero, 32) is None  # below fp16's normal range
    assert gemv_ops.pack_int4_rows(q, torch.ones(64, 2), zero, 32) is not None
    assert gemv_ops.pack_int4_rows(q[:, :62], torch.ones(64, 2), zero, 31) is None  # K not a multiple of 4
    assert gemv_ops.pack_int4_rows(q, torch.ones(64, 1), torch.zeros(64, 1), 64) is not None
    assert gemv_ops.pack_int4_rows(torch.zeros(4, 512, dtype=torch.uint8), torch.ones(4, 1), torch.zeros(4, 1), 512) is None


@pytest.mark.skipif(not gemv_ops.available(), reason="optpass C++ kernels not built here")
@pytest.mark.parametrize("make", [lambda lin: Int8Linear.from_linear(lin), lambda lin: Int4Linear.from_linear(lin, 32),
                                  lambda lin: Int4Linear.from_linear(lin, 64)], ids=["int8", "int4_g32", "int4_g64"])
def test_workspace_dequant_gemm_matches_plain_ops(monkeypatch, make):
    """The C++ dequantize-into-workspace path equals the plain-op dequantize + bf16 GEMM, also when the weight is
    cut into several workspace pieces (the last one short)."""
    from optpass.backends.cpu import quant_linear

    torch.manual_seed(0)
    module = make(nn.Linear(128, 208))
    monkeypatch.setattr(quant_linear, "_CHUNK_ELEMENTS", 128 * 48)  # 208 rows -> pieces of 48 x 4 and 16
    x = torch.randn(40, 128)
    zero, group = module.workspace_args()
    w = torch.empty(208, 128, dtype=torch.bfloat16)
    torch.ops.optpass.dequant_bf16_(w, module.qweight, module.scale, zero, group)
    assert torch.equal(w, module.dequantized_weight().to(torch.bfloat16))
    got = quant_linear._workspace_gemm(x, module.qweight, module.scale, zero, group, 208, 128).float()
    ref = quant_linear._dequantized_gemm(x, module.dequantized_weight(), torch.bfloat16).float()
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not gemv_ops.packed_available(), reason="the packed GEMV needs AVX-512 VNNI")
@pytest.mark.parametrize("n, k", [(96, 256), (50, 3000), (33, 64)])  # N past a 32-block, K past a flush
def test_packed_gemv_is_bit_identical_to_the_row_layout_and_row_exact(n, k):
    g = torch.Generator().manual_seed(n)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g) / 100
    packed = gemv_ops.pack_rows(q)
    assert packed.shape == (-(-n // 32), k // 2, 32, 2)
    for rows in (1, 6, 8):
        x = torch.randn(rows, k, generator=g) * 3
        got = torch.ops.optpass.gemv_int8_packed(x, packed, scale, n)
        assert torch.equal(got, torch.ops.optpass.gemv_int8(x, q, scale))  # same integer sums
        for i in range(rows):  # a verify step's row i is the one-row step at that position
            assert torch.equal(got[i:i + 1], torch.ops.optpass.gemv_int8_packed(x[i:i + 1], packed, scale, n))
        ref = x.double() @ (q.double() * scale.double()[:, None]).T
        torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item())
    # the worst case for int32 lanes: every product at its largest, one sign, K past several flushes
    x = torch.full((1, k), 7.0)
    big = torch.full((n, k), 127, dtype=torch.int8)
    got = torch.ops.optpass.gemv_int8_packed(x, gemv_ops.pack_rows(big), torch.ones(n), n)
    torch.testing.assert_close(got, torch.full((1, n), 7.0 * 127 * k), rtol=1e-6, atol=0)


@pytest.mark.skipif(not gemv_ops.packed_available(), reason="the packed GEMV needs AVX-512 VNNI")
@pytest.mark.parametrize("n, k, group", [(96, 256, 32), (50, 640, 64), (33, 512, 256)])
def test_packed_grouped_gemv_matches_the_dequantized_product_and_is_row_exact(n, k, group):
    g = torch.Generator().manual_seed(k)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, k // group, generator=g) / 100
    packed, packed_scale = gemv_ops.pack_rows(q), gemv_ops.pack_group_scales(scale, group)
    assert packed_scale.shape == (-(-n // 32), k // group, 32)
    x = torch.randn(6, k, generator=g) * 3
    got = torch.ops.optpass.gemv_int8_packed(x, packed, packed_scale, n)
    ref = x.double() @ (q.double() * scale.double().repeat_interleave(group, 1)).T
    torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item())
    for i in range(6):
        assert torch.equal(got[i:i + 1], torch.ops.optpass.gemv_int8_packed(x[i:i + 1], packed, packed_scale, n))
    assert gemv_ops.pack_group_scales(scale[:, :1], 512) is None  # past the kernel's int32 lane bound


def test_int8_linear_decodes_through_the_packed_kernel_with_group_scales(linear):
    module = Int8Linear.from_linear(linear, group_size=32)
    if gemv_ops.packed_available():
        assert "optpass.gemv_int8_packed" in _ops(module, rows=3)
    x = torch.randn(3, 256)
    with torch.no_grad():
        torch.testing.assert_close(module(x), F.linear(x, module.dequantized_weight(), linear.bias),
                                   rtol=1e-3, atol=1e-3)


def test_pack_rows_declines_odd_inputs():
    assert gemv_ops.pack_rows(torch.zeros(4, 7, dtype=torch.int8)) is None


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_int8_numerics(linear, rows):
    module = Int8Linear.from_linear(linear, w8a8_min_rows=16)
    x = torch.randn(2, rows, 256)
    with torch.no_grad():
        got = module(x)
        ref = F.linear(x, module.dequantized_weight(), linear.bias)
        tol = 2e-2 if rows >= 16 else 5e-3  # W8A8 also quantizes activations
        assert ((got - ref).norm() / ref.norm()) < tol
        assert ((got - linear(x)).norm() / linear(x).norm()) < 2.5e-2


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 40])
def test_int4_numerics(linear, group_size, rows):
    module = Int4Linear.from_linear(linear, group_size)
    x = torch.randn(rows, 256)
    with torch.no_grad():
        ref = F.linear(x, module.dequantized_weight(), linear.bias)
        assert ((module(x) - ref).norm() / ref.norm()) < 1e-2  # bf16 activations (tinygemm, prefill) at worst


def test_int4_is_exact_on_a_q4_grid():
    """Weights already on a 4-bit grid with a per-group min (GGUF Q4_1) survive the float-zero format exactly."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (64, 128), generator=g).float()
    q[:, ::32], q[:, 1::32] = 0, 15  # every group spans the full range, as Q4_1 blocks do
    d, m = torch.rand(64, 4, generator=g) * 0.1 + 0.01, torch.randn(64, 4, generator=g) * 0.1
    w = (q.view(64, 4, 32) * d[..., None] + m[..., None]).view(64, 128)
    qq, s, z = quantize_int4(w, 32)
    torch.testing.assert_close(dequantize_int4(unpack_int4(pack_int4(qq)), s, z, 32), w, rtol=0, atol=1e-6)


def test_pass_on_tiny_llama_reports_every_site_and_generates():
    model = tiny_llama()
    out = optpass.optimize(model, passes=[QuantizeConfig(fast_decode=False)], quality_budget="kl:0.05")
    record = next(r for r in out.optpass_report.passes if r.name == "quantize")
    assert record.status == "applied", record.reason
    assert len(record.sites) == 15
    assert record.details["blocks"]["kept"] in {"blocks int4 g32", "blocks int8"}
    assert record.details["lm_head"]["kept"] in {"lm_head int4 g32", "lm_head int8"}
    assert sum(isinstance(m, (Int8Linear, Int4Linear)) for m in out.modules()) == 15
    ids = torch.randint(0, 256, (1, 6))
    assert out.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 10)


def test_unsupported_shapes_are_skipped_with_a_reason():
    model = tiny_llama(hidden=48, heads=4, kv_heads=2)  # K = 48 is not a multiple of the int4 group 32
    out = optpass.optimize(model, passes=[QuantizeConfig(weights="int4", lm_head="keep", fast_decode=False)],
                           quality_budget="kl:1")
    report = out.optpass_report
    skipped = [c for c in report.candidates if not c.chosen and "not divisible by group_size 32" in c.reason]
    assert skipped, str(report)
    # the layers whose K = 96 (down_proj) still take int4
    assert all(isinstance(out.get_submodule(f"model.layers.{i}.mlp.down_proj"), Int4Linear) for i in range(2))
    assert isinstance(out.model.layers[0].self_attn.q_proj, nn.Linear)


def test_budget_fallback_and_rollback_reason():
    model = tiny_llama()
    out = optpass.optimize(model, passes=[QuantizeConfig(fast_decode=False)], quality_budget="kl:1e-9")
    record = out.optpass_report.passes[0]
    assert record.status == "skipped"
    assert "blocks int4 g32: over budget" in record.reason and "blocks int8: over budget" in record.reason
    assert not any(isinstance(m, (Int8Linear, Int4Linear)) for m in out.modules())


def test_serialized_state_reloads_without_requantizing():
    model = tiny_llama()
    out = optpass.optimize(model, passes=[QuantizeConfig(fast_decode=False)], quality_budget="kl:1")
    layout = quantized_modules(out)
    blob = save({k: v.contiguous() for k, v in out.state_dict().items()})
    tensors = load(blob)
    assert tensors["model.layers.0.mlp.up_proj.qweight"].dtype in (torch.int8, torch.uint8)
    fresh = rebuild_quantized(tiny_llama(seed=123), layout)
    fresh.load_state_dict(tensors)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, out(input_ids=ids).logits, rtol=0, atol=0)


def test_config_validation():
    with pytest.raises(optpass.ConfigError, match="group_size=48"):
        QuantizeConfig(group_size=48)
    with pytest.raises(optpass.ConfigError, match="weights='int3'"):
        QuantizeConfig(weights="int3")
    assert QuantizeConfig.from_dict(QuantizeConfig(weights="int8").to_dict()) == QuantizeConfig(weights="int8")


@pytest.mark.slow
def test_smollm2_int8_greedy_matches_fp32(smollm2):
    """The benchmark prompt (the corpus' first 64 tokens): fed fp32's greedy continuation one token at a time (the
    decode path, M = 1 rows), int8 picks fp32's token at >= 120 of 128 steps. Teacher forcing keeps one near-tie
    (fp32's margin at step 2 is 0.14 logits, inside int8's weight noise) from deciding every later step."""
    from optpass.corpus import token_windows

    model, tok = smollm2
    out = optpass.optimize(model, passes=[QuantizeConfig(weights="int8", lm_head="int8", fast_decode=False)])
    ids = token_windows(tok, 64, 1)
    want = model.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False)
    with torch.no_grad():
        step = out(want[:, :64], use_cache=True)
        picked = [step.logits[0, -1].argmax()]
        for t in range(64, 64 + 127):
            step = out(want[:, t:t + 1], past_key_values=step.past_key_values, use_cache=True)
            picked.append(step.logits[0, -1].argmax())
    agreed = int((torch.stack(picked) == want[0, 64:]).sum())
    assert agreed >= 120, agreed
    assert out.optpass_report.passes[0].quality["ppl_increase"] < 0.01


