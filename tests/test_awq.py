from __future__ import annotations

import copy

import torch

import optpass
from optpass.adapters import Batch
from optpass.models import tiny_llama
from optpass.passes.awq import apply_awq, fold_groups
from optpass.passes.quantize import QuantizeConfig


def _salient_model():
    """A tiny Llama whose norms amplify a few channels, as real LLMs' activation outliers do."""
    model = tiny_llama(hidden=64, layers=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] *= 25
            layer.post_attention_layernorm.weight[5:9] *= 25
    return model


def test_fold_groups_follow_the_graph():
    model = _salient_model()
    graph = optpass.capture(model)
    sites = tuple(s.name for s in graph.linears)
    groups, unscaled = fold_groups(graph, model, sites)
    folds = {tuple(sorted(g["linears"])): g["fold"] for g in groups}
    assert folds[("model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj",
                  "model.layers.0.self_attn.v_proj")] == ("norm", "model.layers.0.input_layernorm")
    assert folds[("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj")] == \
        ("norm", "model.layers.1.post_attention_layernorm")
    assert folds[("model.layers.0.mlp.down_proj",)] == ("rows", "model.layers.0.mlp.up_proj")
    assert folds[("lm_head",)] == ("norm", "model.norm")
    assert set(unscaled) == {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"}


def test_scaling_preserves_the_float_model_and_the_tied_embedding():
    model = _salient_model()
    graph = optpass.capture(model)
    ids = torch.randint(0, 256, (2, 32))
    before = model(input_ids=ids).logits
    embedding = model.model.embed_tokens.weight.clone()
    scaled = copy.deepcopy(model)
    info = apply_awq(scaled, tuple(s.name for s in graph.linears if "o_proj" not in s.name), 32,
                     [Batch(kwargs={"input_ids": ids})], graph)
    assert any(alpha > 0 for alpha in info["alphas"].values())
    torch.testing.assert_close(scaled(input_ids=ids).logits, before, atol=1e-4, rtol=1e-4)
    assert torch.equal(scaled.model.embed_tokens.weight, embedding)


def test_awq_lowers_quantization_error_on_salient_channels():
    model = _salient_model()
    ids = torch.randint(0, 256, (4, 64))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    kl = {}
    for awq in (False, True):
        cfg = QuantizeConfig(weights="int4", lm_head="keep", awq=awq, fast_decode=False)
        out = optpass.optimize(model, passes=[cfg], quality_budget="kl:10", calibration_data=[{"input_ids": ids}])
        with torch.no_grad():
            kl[awq] = optpass.quality.logits_kl(reference, out(input_ids=ids).logits)
    assert kl[True] < kl[False]
