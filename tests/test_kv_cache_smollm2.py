"""KV-cache compression on SmolLM2 (real weights): batched left-padded decoding, passkey retrieval through the
compressed cache, and the `kv_cache` pass end to end through `optimize()`."""

from __future__ import annotations

import copy

import pytest
import torch

from optpass.backends.kv import CompressedKVCache, KVSettings, enable_compressed_attention

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker who",
    "Here is a short list of the three primary colours used in painting:",
]


@pytest.fixture(scope="module")
def model_tok(smollm2):
    model, tok = smollm2
    model = copy.deepcopy(model)
    enable_compressed_attention(model)
    return model, tok


def test_batch_of_four_left_padded_prompts_equals_per_prompt_runs(model_tok):
    model, tok = model_tok
    settings = KVSettings(policy="h2o", keep=256, bits=8)  # budget above every context: nothing is evicted
    layers = model.config.num_hidden_layers
    tok.padding_side = "left"
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    assert len({int(m.sum()) for m in batch.attention_mask}) == 4, "prompts of different lengths"
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id,
                             cache=CompressedKVCache(settings, layers))
        for row, prompt in enumerate(PROMPTS):
            ids = tok(prompt, return_tensors="pt").input_ids
            single = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id,
                                    cache=CompressedKVCache(settings, layers))
            assert out[row, batch.input_ids.shape[1]:].tolist() == single[0, ids.shape[1]:].tolist(), prompt
            full = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
            assert single.tolist() == full.tolist(), "int8 KV with room for everything decodes like the full cache"


def test_passkey_survives_a_quarter_budget_with_int8_kv(model_tok):
    from optpass.corpus import passkey_prompt

    model, tok = model_tok
    ids, answer = passkey_prompt(tok, 1024, 0.5, 48213)
    cache = CompressedKVCache(KVSettings(policy="snapkv", keep=0.25, bits=8), model.config.num_hidden_layers)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, cache=cache, pad_token_id=tok.eos_token_id)
    assert answer in tok.decode(out[0, ids.shape[1]:])
    full_bytes = 30 * 2 * 3 * ids.shape[1] * 64 * 4
    assert cache.nbytes() <= 0.15 * full_bytes


def test_kv_cache_pass_through_optimize(smollm2):
    import optpass
    from optpass.passes.kv_cache import KVCacheConfig

    model, tok = smollm2
    optimized = optpass.optimize(model, passes=[KVCacheConfig(policy="snapkv", keep=0.5)], quality_budget="kl:0.5")
    record = next(r for r in optimized.optpass_report.passes if r.name == "kv_cache")
    assert record.status == "applied", record.reason
    quality = record.details["continuation_quality"]["0.5"]
    assert 0 <= quality["kl"] <= 0.5 and quality["top1"] > 0.5
    assert optimized.optpass_runtime.plan.kv["keep"] == 0.5
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    out = optimized.generate(ids, max_new_tokens=8, do_sample=False)  # a compressed cache is created per call
    assert out.shape == (1, ids.shape[1] + 8)
    assert not hasattr(model, "optpass_runtime"), "the caller's model is untouched"
    with pytest.raises(optpass.errors.ConfigError, match="outside"):
        KVCacheConfig(keep=1.5)
