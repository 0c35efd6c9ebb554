"""A tied input embedding reads its rows from the quantized LM head (`backends/cpu/head_embedding.py`)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import optpass
from optpass.backends.cpu.head_embedding import HeadRowsEmbedding, share_reason
from optpass.backends.cpu.quant_linear import Int4Linear, Int8Linear
from optpass.backends.quant_format import dequantize_int8, quantize_int8
from optpass.passes.quantize import QuantizeConfig, quantized_modules, rebuild_quantized
from tests import model_zoo

HEAD_INT8 = QuantizeConfig(weights="int8", lm_head="int8", skip=("model.layers",), fast_decode=False)  # head only


def _tensor_bytes(model: nn.Module) -> int:
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    return sum(seen.values())


@pytest.mark.parametrize("make", [lambda lin: Int8Linear.from_linear(lin),
                                  lambda lin: Int8Linear.from_linear(lin, group_size=32),
                                  lambda lin: Int4Linear.from_linear(lin, 32)])
def test_rows_are_the_dequantized_head_rows_times_the_scale(make):
    torch.manual_seed(0)
    head = make(nn.Linear(64, 112, bias=False))
    ids = torch.tensor([[3, 111, 0], [3, 7, 50]])
    got = HeadRowsEmbedding(head, output_scale=2.5)(ids)
    assert got.shape == (2, 3, 64)
    torch.testing.assert_close(got, head.dequantized_weight()[ids] * 2.5, rtol=0, atol=0)


def test_gemma3_scaled_lookup_is_shared_and_a_non_lookup_is_refused():
    model = model_zoo.gemma3()
    assert share_reason(model, model.lm_head) == ""  # a lookup times embed_scale (sqrt(hidden))
    untied = model_zoo._causal("qwen2", tie_word_embeddings=False)
    assert share_reason(untied, untied.lm_head) == "the head is not tied to the input embedding"
    normed = model_zoo.gemma3()
    table = normed.get_input_embeddings()
    normed.model.embed_tokens = nn.Sequential(nn.Embedding.from_pretrained(table.weight, freeze=True), nn.LayerNorm(64))
    normed.model.embed_tokens.weight = table.weight
    assert "not a row lookup times a constant" in share_reason(normed, normed.lm_head)


def test_quantized_tied_head_frees_the_float_table_and_matches_an_independent_reference():
    model = model_zoo.gemma3()
    reference = copy.deepcopy(model)
    before = _tensor_bytes(model)
    out = optpass.optimize(model, passes=[HEAD_INT8], quality_budget="kl:1")
    record = out.optpass_report.passes[0]
    assert record.status == "applied" and record.details["lm_head"]["kept"] == "lm_head int8", record.reason
    assert isinstance(out.get_input_embeddings(), HeadRowsEmbedding)
    assert "reads the quantized head's rows" in record.details["input embedding"]
    table = 128 * 64 * 4
    assert _tensor_bytes(out) < before - table + 3 * 128 * 64  # table gone; int8 head, packed copy, scales
    # the same model with its one tied table replaced by the int8-dequantized head, in float
    q, scale = quantize_int8(reference.lm_head.weight.detach())
    with torch.no_grad():
        reference.lm_head.weight.copy_(dequantize_int8(q, scale))  # tied: the lookup sees the same rows
    ids = model_zoo._ids()["input_ids"][:1, :8]  # <= 8 rows: the int8 head runs its GEMV (fp32 activations)
    with torch.no_grad():
        got = out(input_ids=ids).logits
        torch.testing.assert_close(got, reference(input_ids=ids).logits, rtol=0, atol=1e-4)
        reference.model.embed_tokens.weight = nn.Parameter(model_zoo.gemma3().model.embed_tokens.weight)
        float_table = reference(input_ids=ids).logits  # the old behaviour: float lookups, int8 head
    assert (got - float_table).abs().max() > 1e-3  # the check above tells the two apart


def test_shared_embedding_survives_a_checkpoint_round_trip():
    out = optpass.optimize(model_zoo.gemma3(), passes=[HEAD_INT8], quality_budget="kl:1")
    layout = quantized_modules(out)
    assert layout["model.embed_tokens"]["scheme"] == "head_rows" and layout["model.embed_tokens"]["head"] == "lm_head"
    state = {k: v.clone() for k, v in out.state_dict().items()}
    assert "model.embed_tokens.weight" not in state
    fresh = model_zoo.gemma3()
    fresh.config.tie_word_embeddings = False
    fresh = rebuild_quantized(fresh, layout)
    fresh.load_state_dict(state)
    assert fresh.get_input_embeddings().head is fresh.lm_head
    ids = model_zoo._ids()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, out(input_ids=ids).logits, rtol=0, atol=0)


def test_a_rolled_back_head_restores_the_tied_float_embedding():
    model = model_zoo.gemma3()
    embedding = model.get_input_embeddings()
    out = optpass.optimize(model, passes=[QuantizeConfig(weights="int8", lm_head="int8", fast_decode=False)],
                           quality_budget="kl:1e-12")
    assert out.optpass_report.passes[0].status == "rolled_back"
    restored = out.get_input_embeddings()
    assert type(restored) is type(embedding) and torch.equal(restored.weight, embedding.weight)
    assert out.lm_head.weight.data_ptr() == restored.weight.data_ptr()  # tied again
