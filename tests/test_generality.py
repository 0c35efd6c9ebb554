"""Beyond Llama: KV compression on Qwen3 / Gemma-3 / Llama through transformers' own extension points, GPT-2's
Conv1D layers, a softcapped head, sliding-window caches that match transformers' exactly, budgets that cannot be
measured, padding masked out of quality."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import optpass
from optpass.backends.kv import CompressedKVCache, KVSettings, enable_compressed_attention
from optpass.backends.kv.cache import static_cache
from optpass.errors import ConfigError, UnsupportedModelError
from optpass.hf_compat import output_cache
from tests import model_zoo


def _cache_bytes(cache) -> int:
    if isinstance(cache, CompressedKVCache):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3"])
def test_kv_pass_shrinks_the_generate_cache_at_a_long_prompt(name):
    model = getattr(model_zoo, name)()
    prompt = torch.randint(0, model_zoo.VOCAB, (1, 1536), generator=torch.Generator().manual_seed(3))
    optimized = optpass.optimize(model, passes=["kv_cache"], objective="memory", quality_budget="kl:0.5")
    record = optimized.optpass_report.passes[0]
    assert record.status == "applied", record.reason
    with torch.no_grad():
        out = optimized.generate(prompt, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
        ref = model.generate(prompt, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    compressed, full = output_cache(optimized, out), output_cache(model, ref)
    assert isinstance(compressed, CompressedKVCache)
    assert _cache_bytes(compressed) < 0.8 * _cache_bytes(full)
    quality = record.details["continuation_quality"]
    kept = str(record.details["settings"]["keep"])
    assert quality[kept]["kl"] <= 0.5, "the chosen budget's measured continuation is within the quality budget"


@pytest.mark.parametrize("name", ["gemma3", "gemma2", "mistral", "qwen3", "gpt2"])
def test_optpass_caches_match_transformers_exactly(name):
    """With room for every token, the compressed cache (sliding layers as exact rings) and the static cache
    give the same logits as transformers' own DynamicCache, softcap and sliding windows included."""
    model = getattr(model_zoo, name)()
    ids = torch.randint(0, model_zoo.VOCAB, (1, 30), generator=torch.Generator().manual_seed(0))

    def run(cache):
        return model_zoo.last_logits_through(model, ids, cache, model_zoo.STEPS[:10])

    with torch.no_grad():
        ref = run(DynamicCache(config=model.config))
        enable_compressed_attention(model)
        compressed = run(CompressedKVCache(KVSettings(keep=200, bits=None, window=8), model.config))
        static = run(static_cache(model.config, 64))
    torch.testing.assert_close(compressed, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(static, ref, atol=1e-5, rtol=1e-5)


def test_kv_support_is_positive_and_named():
    from optpass.backends.kv.attention import support_reason

    assert support_reason(model_zoo.llama()) is None
    assert "not a transformers model" in support_reason(model_zoo.mlp())
    with pytest.raises(UnsupportedModelError, match="not a transformers model"):
        enable_compressed_attention(model_zoo.mlp())


def test_gpt2_conv1d_layers_are_quantized():
    from optpass.backends.cpu.quant_linear import QuantizedLinear

    model = model_zoo.gpt2()
    graph = optpass.capture(model)
    conv = [s for s in graph.linears if s.layout == "conv1d"]
    assert len(conv) == 8 and all(s.block is not None for s in conv)
    out = optpass.optimize(model, passes=["quantize"], quality_budget="kl:0.05")
    assert out.optpass_report.passes[0].status == "applied"
    assert isinstance(out.transformer.h[0].attn.c_attn, QuantizedLinear)
    assert isinstance(out.transformer.h[1].mlp.c_proj, QuantizedLinear)
    ids = torch.randint(0, model_zoo.VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = model(input_ids=ids).logits, out(input_ids=ids).logits
    assert optpass.quality.logits_kl(ref, got) < 0.05


def test_softcapped_head_is_found():
    graph = optpass.capture(model_zoo.gemma2())  # lm_head -> / 30 -> tanh -> * 30 -> logits
    heads = [s.name for s in graph.linears if s.is_output_head]
    assert heads == ["lm_head"]
    assert len(graph.attentions) == 2, "eager (softcapped) attention is indexed too"


@pytest.mark.parametrize("model_name, budget, term", [("llama", "psnr:30", "psnr"), ("mlp", "kl:0.1", "kl"),
                                                       ("dit", "cosine:0.99", "cosine")])
def test_unmeasurable_budget_is_refused(model_name, budget, term):
    model = getattr(model_zoo, model_name)()
    extra = model_zoo.MODELS[model_name][2]
    with pytest.raises(ConfigError, match=f"{term}.*cannot be measured"):
        optpass.optimize(model, passes=["quantize"], quality_budget=budget, **extra)


def test_padding_is_masked_out_of_every_metric():
    from optpass.metrics import embedding_cosine, logits_kl, perplexity, rel_l2

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 6, 10, generator=g)
    new = ref.clone()
    new[1, 4:] += 100.0  # garbage on padded positions only
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    assert rel_l2(ref, new, mask) == 0.0 and rel_l2(ref, new) > 1.0
    assert logits_kl(ref, new, mask) == pytest.approx(0.0, abs=1e-6)
    assert embedding_cosine(ref, new, mask) == pytest.approx(1.0, abs=1e-6)
    ids = torch.randint(0, 10, (2, 6), generator=g)
    assert perplexity(ref, ids, mask) == pytest.approx(perplexity(new, ids, mask))


def test_encoder_gets_a_pooled_embedding_budget():
    model = model_zoo.bert()
    out = optpass.optimize(model, passes=["quantize"])
    assert out.optpass_report.budget == {"min_cosine": 0.99}
    record = out.optpass_report.passes[0]
    assert record.status == "applied" and record.quality["cosine"] >= 0.99
