"""GGUF export (`optpass.save(..., format="gguf")`): tensor types and names as llama.cpp's converter writes them,
dequantized tensors equal to optpass's weights up to the fp16 rounding of scales / minimums, q / k rows in
GGUF's rotary order, clear refusals; llama.cpp (when installed) computes the same logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import optpass
from optpass.errors import ConfigError, ExportError
from optpass.passes.quantize import QuantizeConfig
from tests.export_helpers import dequantized, quantize_as, sharp_tiny_llama

gguf = pytest.importorskip("gguf")

HEADS, KV_HEADS = 4, 2
PROJ = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def optimized():
    """int4 g32 blocks + int8 head, chosen by optimize() (its records travel in the file)."""
    return optpass.optimize(sharp_tiny_llama(), passes=[QuantizeConfig(weights="int4", lm_head="int8", fast_decode=False)],
                            quality_budget="kl:1")


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _weight(t) -> torch.Tensor:
    """A GGUF tensor as rows [N, K] in fp32, dequantized by the gguf package itself."""
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))


def _hf_rows_to_gguf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute, written out independently."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _fp16_bound(module) -> torch.Tensor:
    """|W_gguf - W| <= 2^-11 (|q| |d| + |m|) per weight: d and m each rounded to fp16 once."""
    n, k = module.out_features, module.in_features
    scale = module.scale.float()
    scale = scale[:, None].expand(n, k // 32) if scale.dim() == 1 else scale.repeat_interleave(k // scale.shape[1] // 32, 1)
    d = scale.repeat_interleave(32, dim=1)
    if hasattr(module, "zero"):
        zero = module.zero.float().repeat_interleave(module.group_size, dim=1)
        return 2.0 ** -11 * (15 * d + (zero * d).abs()) + 1e-7
    return 2.0 ** -11 * 127 * d + 1e-7


def _gguf_rows(tensor_name: str, w: torch.Tensor) -> torch.Tensor:
    """HF rows in the order the GGUF tensor holds them (q / k permuted)."""
    if tensor_name.endswith("attn_q.weight"):
        return _hf_rows_to_gguf(w, HEADS)
    if tensor_name.endswith("attn_k.weight"):
        return _hf_rows_to_gguf(w, KV_HEADS)
    return w


def test_types_metadata_and_weights_match_optpass(optimized, tmp_path):
    path = optpass.save(optimized, tmp_path / "tiny.gguf", format="gguf")
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["output.weight"].tensor_type.name == "Q8_0"  # the int8 head, its own tensor
    assert tensors["token_embd.weight"].tensor_type.name == "F32"  # random fp32: only F32 holds it exactly
    assert {tensors[f"blk.{b}.{p}.weight"].tensor_type.name for b in range(2) for p in PROJ} == {"Q4_1"}
    assert {tensors[f"blk.{b}.{n}.weight"].tensor_type.name for b in range(2) for n in ("attn_norm", "ffn_norm")} == {"F32"}
    assert len(tensors) == 1 + 2 * 9 + 2
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.tokens")}
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (HEADS, KV_HEADS)
    assert (meta["llama.embedding_length"], meta["llama.feed_forward_length"], meta["llama.vocab_size"]) == (64, 128, 256)
    assert meta["llama.rope.dimension_count"] == 16 and meta["general.file_type"] == 3  # MOSTLY_Q4_1
    assert meta["tokenizer.ggml.model"] == "none"  # no tokenizer: llama.cpp takes token ids
    state = json.loads(meta["optpass.state"])
    assert [p["name"] for p in state["passes"]] == ["quantize"]
    assert state["export"]["tensor_types"] == {"F32": 6, "Q4_1": 14, "Q8_0": 1}
    assert 0 < state["export"]["weight_error"]["max_in_steps"] < 0.1
    for b, layer in enumerate(optimized.model.layers):
        for short, attr in PROJ.items():
            name = f"blk.{b}.{short}.weight"
            module = layer.get_submodule(attr)
            got, want = _weight(tensors[name]), _gguf_rows(name, dequantized(module))
            assert bool(((got - want).abs() <= _gguf_rows(name, _fp16_bound(module))).all()), name
    head = _weight(tensors["output.weight"])
    assert bool(((head - dequantized(optimized.lm_head)).abs() <= _fp16_bound(optimized.lm_head)).all())
    torch.testing.assert_close(_weight(tensors["token_embd.weight"]), optimized.model.embed_tokens.weight, atol=0, rtol=0)


def test_int8_channel_and_group_int4_g64_and_a_tied_float_head(tmp_path):
    """Mixed per-layer precision; group sizes above 32 repeat their (d, m) per block; a float head tied to the
    embedding is left to llama.cpp's fallback onto token_embd (no output.weight)."""
    model = quantize_as(sharp_tiny_llama(), {"q_proj": ("int8", 0), "k_proj": ("int8", 64), "v_proj": ("int4", 64),
                                              "o_proj": ("int8", 32), "mlp.gate_proj": ("int4", 32),
                                              "mlp.up_proj": ("int4", 64), "mlp.down_proj": ("int4", 128)})
    path = optpass.save(model, tmp_path / "mixed.gguf", format="gguf")
    tensors = _tensors(path)
    assert "output.weight" not in tensors
    types = {p: tensors[f"blk.0.{p}.weight"].tensor_type.name for p in PROJ}
    assert types == {"attn_q": "Q8_0", "attn_k": "Q8_0", "attn_v": "Q4_1", "attn_output": "Q8_0",
                     "ffn_gate": "Q4_1", "ffn_up": "Q4_1", "ffn_down": "Q4_1"}
    for b, layer in enumerate(model.model.layers):
        for short, attr in PROJ.items():
            name = f"blk.{b}.{short}.weight"
            module = layer.get_submodule(attr)
            want = _gguf_rows(name, dequantized(module))
            torch.testing.assert_close(_weight(tensors[name]), want, rtol=0, atol=2e-3 * float(want.abs().max()))


def test_float_matrices_are_written_losslessly():
    """A matrix on a Q8_0 grid (e.g. an embedding dequantized from a Q8_0 GGUF) re-packs bit-exactly to Q8_0;
    one exact in fp16 goes to F16; anything else stays F32."""
    from optpass.export.gguf_blocks import lossless_float

    g = torch.Generator().manual_seed(0)
    d = (torch.rand(8, 4, 1, generator=g) * 0.01 + 1e-3).half().float()
    q = torch.randint(-127, 128, (8, 4, 32), generator=g).float()
    q[..., 0] = 127  # every block reaches its amax, as ggml's own quantization leaves it
    on_grid = (q * d).view(8, 128)
    raw, kind = lossless_float(on_grid)
    assert kind == "Q8_0"
    back = torch.from_numpy(np.array(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0)))
    assert torch.equal(back, on_grid)
    assert lossless_float(torch.randn(8, 128, generator=g).half().float())[1] == "F16"
    assert lossless_float(torch.randn(8, 128, generator=g))[1] == "F32"


def test_removed_blocks_are_left_out_and_the_rest_renumbered(tmp_path):
    from optpass.passes.layer_skip import RemovedBlock

    model = quantize_as(sharp_tiny_llama(), {"proj": ("int4", 32)})
    kept = model.model.layers[1]
    model.model.layers[0] = RemovedBlock(0)
    path = optpass.save(model, tmp_path / "skip.gguf", format="gguf")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["llama.block_count"].contents() == 1
    got = _weight({t.name: t for t in reader.tensors}["blk.0.ffn_down.weight"])
    torch.testing.assert_close(got, dequantized(kept.mlp.down_proj), rtol=0, atol=1e-3)


def test_unsupported_models_and_layouts_are_refused(tmp_path):
    from optpass.backends.cpu.quant_linear import Int4Linear
    from tests.model_zoo import qwen2

    with pytest.raises(ExportError, match=r"Qwen2ForCausalLM \(qwen2\) is not supported; .*LlamaForCausalLM"):
        optpass.save(qwen2(), tmp_path / "q.gguf", format="gguf")
    model = sharp_tiny_llama()
    model.model.layers[0].mlp.up_proj = Int4Linear.from_linear(model.model.layers[0].mlp.up_proj, 16)
    with pytest.raises(ExportError, match="group size 16 is not a multiple of GGUF's 32-weight blocks"):
        optpass.save(model, tmp_path / "g16.gguf", format="gguf")
    assert not (tmp_path / "g16.gguf").exists()  # nothing half-written is left behind
    with pytest.raises(ExportError, match="must be a file name ending in .gguf"):
        optpass.save(model, tmp_path / "dir", format="gguf")
    with pytest.raises(ConfigError, match="unknown export format 'ggml'; formats: optpass, gguf, compressed-tensors"):
        optpass.save(model, tmp_path / "x", format="ggml")


def _llama_cpp_logits(path, ids: torch.Tensor) -> torch.Tensor:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=2, verbose=False)
    llm.eval(ids[0].tolist())
    return torch.from_numpy(np.array(llm.scores[: ids.shape[1]], dtype=np.float32))


def test_llama_cpp_computes_optpass_logits(optimized, tmp_path, monkeypatch):
    """llama.cpp on the export vs the fp32 twin of optpass's weights (llama.cpp's Q4_1 matmul quantizes its
    activations to 8 bits: close, not equal); with the q / k rows left in HF order the logits are far off."""
    pytest.importorskip("llama_cpp")
    import optpass.export.gguf as gguf_export
    from optpass.export.candidates import float_twin

    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = float_twin(optimized, lambda lw: lw.dequantized())(input_ids=ids).logits[0]
    got = _llama_cpp_logits(optpass.save(optimized, tmp_path / "tiny.gguf", format="gguf"), ids)
    error = float((got - want).abs().max())
    assert error < 0.02 * float(want.abs().max())
    assert bool((got.argmax(-1) == want.argmax(-1)).all())
    monkeypatch.setattr(gguf_export, "rope_row_order", lambda rows, heads: torch.arange(rows))
    unpermuted = _llama_cpp_logits(optpass.save(optimized, tmp_path / "hf_order.gguf", format="gguf"), ids)
    assert float((unpermuted - want).abs().max()) > 10 * error
