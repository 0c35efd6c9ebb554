"""KV-cache compression: budgets, storage, policies, eviction, RoPE, HF / static / export integration, the pass."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from optpass.backends.runtime import DecodeEngine, DecodePlan
from optpass.backends.kv import CompressedKVCache, KVSettings, enable_compressed_attention
from optpass.backends.kv.export import FixedBudgetDecodeStep
from optpass.backends.kv.layer import CompressedLayer
from optpass.backends.kv.policies import get_policy
from optpass.backends.kv.policies.budgets import density, pyramid, schedule_weights
from optpass.backends.kv.policies.merge import merge_evicted
from optpass.backends.kv.storage import SlotStore
from optpass.errors import ConfigError
from optpass.models import tiny_llama


@pytest.fixture
def model():
    m = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, vocab=128, seed=1)
    enable_compressed_attention(m)
    return m


def _ids(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _step_logits(model, cache, ids: torch.Tensor, steps: list[int]) -> list[torch.Tensor]:
    """Prefill `ids`, then feed `steps` tokens one by one at their true positions; logits of every call."""
    out = [model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1]]
    for i, t in enumerate(steps):
        pos = torch.tensor([[ids.shape[1] + i]])
        out.append(model(input_ids=torch.tensor([[t]]), cache=cache, position_ids=pos, use_cache=True).logits[:, -1])
    return out


@pytest.mark.parametrize("kwargs, message", [
    ({"keep": 0.0}, "outside (0, 1]"),
    ({"keep": 1.5}, "outside (0, 1]"),
    ({"keep": -0.2}, "outside (0, 1]"),
    ({"keep": 4, "sink": 4}, "not above the sink size"),
    ({"bits": 3}, "bits=3"),
    ({"policy": "nope"}, "unknown KV policy"),
    ({"keep": "half"}, "ratio in (0, 1] or a token count"),
])
def test_bad_budgets_get_a_clear_error(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        KVSettings(**kwargs)


def test_budget_exceeding_context_matches_the_full_cache(model):
    ids, steps = _ids(40), [5, 17, 99, 3, 64, 2]
    ref = _step_logits(model, DynamicCache(), ids, steps)
    new = _step_logits(model, CompressedKVCache(KVSettings(keep=200, bits=None, window=8), 2), ids, steps)
    for r, n in zip(ref, new):
        torch.testing.assert_close(n, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits, tol, max_ratio", [(8, 0.02, 0.30), (4, 0.2, 0.17)])
def test_packed_storage_roundtrip_and_bytes(bits, tol, max_ratio):
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 3, 16, 64, generator=g), torch.randn(2, 3, 16, 64, generator=g)
    store = SlotStore(2, 3, 16, 64, bits, torch.float32, torch.device("cpu"))
    store.set_key_scale(keys, torch.ones(2, 16, dtype=torch.bool))
    store.write(torch.arange(16).expand(2, 3, 16), keys, values)
    assert (store.decode_keys() - keys).norm() / keys.norm() < tol
    assert (store.decode_values() - values).norm() / values.norm() < tol
    packed = store.keys.nbytes + store.values.nbytes + store.value_scale.nbytes
    assert packed <= max_ratio * (keys.nbytes + values.nbytes)


def test_eviction_keeps_budget_sinks_and_recent_window(model):
    cache = CompressedKVCache(KVSettings(policy="h2o", keep=20, window=4, sink=2, bits=8), 2)
    _step_logits(model, cache, _ids(50), list(range(30)))
    for layer in cache.layers:
        ages = layer.age[0]
        assert (ages >= 0).all(), "a full cache has no empty slot"
        assert ages.shape[-1] == layer.capacity == 16
        for head in ages:
            assert {0, 1} <= set(head.tolist()), "sinks are never evicted"
            assert len(set(head.tolist())) == len(head), "a token is stored once"
        assert sorted(layer.win_age[0, 0].tolist()) == [76, 77, 78, 79]
        assert int(layer.t) == 80 and layer.seen == 80


def test_kept_keys_keep_their_original_rope_positions(model):
    ids = _ids(60)
    full = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, cache=full, use_cache=True)
    cache = CompressedKVCache(KVSettings(policy="snapkv", keep=24, window=8, bits=None), 2)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    for i, layer in enumerate(cache.layers):
        ref_keys = full.layers[i].keys[0]  # [H, S, D], RoPE applied at each token's position
        stored = layer.store.decode_keys()[0]
        for h in range(ref_keys.shape[0]):
            kept = layer.age[0, h]
            torch.testing.assert_close(stored[h][kept >= 0], ref_keys[h, kept[kept >= 0].long()])
        assert len(set(layer.age[0, 0].tolist())) < 60, "something was evicted"


def test_snapkv_keeps_the_token_the_question_attends_to():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 64, 16) * 0.1, torch.randn(1, 1, 64, 16) * 0.1, torch.randn(1, 1, 64, 16)
    k[0, 0, 20] = 5.0  # a key every late query matches strongly
    q[0, :, -8:] = 5.0
    layer = CompressedLayer(capacity=6, window=8, sink=2, bits=None, policy=get_policy("snapkv"))
    layer.load_prompt(q, k, v, torch.ones(1, 64, dtype=torch.bool), 0.25)
    assert 20 in layer.age[0, 0].tolist()
    assert {0, 1} <= set(layer.age[0, 0].tolist())


def test_h2o_prefill_scores_are_attention_column_sums():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 300, 8, generator=g), torch.randn(1, 2, 300, 8, generator=g)
    scores = get_policy("h2o").prefill_scores(q, k, torch.ones(1, 300, dtype=torch.bool), 0.3)
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, dim=1)) * 0.3
    probs = logits.masked_fill(torch.ones(300, 300, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    ref = probs.sum(2).view(1, 2, 2, 300).sum(2)
    torch.testing.assert_close(scores, ref, atol=1e-4, rtol=1e-4)


def test_ties_keep_the_older_token_deterministically():
    q, k, v = torch.zeros(1, 1, 40, 8), torch.zeros(1, 1, 40, 8), torch.randn(1, 1, 40, 8)
    kept = []
    for _ in range(2):
        layer = CompressedLayer(capacity=10, window=4, sink=2, bits=None, policy=get_policy("h2o"))
        layer.load_prompt(q, k, v, torch.ones(1, 40, dtype=torch.bool), 1.0)
        kept.append(layer.age[0, 0].tolist())
    assert kept[0] == kept[1]
    # uniform attention: earlier tokens received more (causal) mass; among equals the older wins
    assert sorted(kept[0]) == list(range(10))


def test_merge_folds_an_evicted_token_into_its_nearest_kept_one():
    kept_k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    kept_v = torch.tensor([[[[2.0, 2.0], [4.0, 4.0]]]])
    keys = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])  # token 0 ~ kept slot 1, token 1 ~ kept slot 0
    values = torch.tensor([[[[6.0, 6.0], [0.0, 0.0]]]])
    valid = torch.ones(1, 1, 2, dtype=torch.bool)
    new_k, new_v = merge_evicted(kept_k, kept_v, valid, keys, values, torch.tensor([[[0]]]), torch.ones(1, 1, 1, dtype=torch.bool), 0.5)
    torch.testing.assert_close(new_v, torch.tensor([[[[2.0, 2.0], [5.0, 5.0]]]]))  # (4 + 1 * 6) / 2
    torch.testing.assert_close(new_k[0, 0, 0], kept_k[0, 0, 0])
    diagonal = torch.tensor([[[[0.7071, 0.7071]]]])  # cosine 0.707 to both kept keys: below a 0.9 threshold
    _, untouched = merge_evicted(kept_k, kept_v, valid, diagonal, values[:, :, :1], torch.tensor([[[0]]]),
                                 torch.ones(1, 1, 1, dtype=torch.bool), 0.9)
    torch.testing.assert_close(untouched, kept_v)


def test_layer_budget_schedules():
    w = pyramid(30)
    assert abs(sum(w) / 30 - 1) < 1e-9 and w[0] > w[15] > w[-1]
    d = density([0.5, 0.25, 0.25, 0.0])
    assert abs(sum(d) / 4 - 1) < 1e-9 and d[0] > d[1] == d[2] > d[3] > 0
    with pytest.raises(ConfigError, match="unknown KV budget schedule"):
        schedule_weights("zigzag", 4)
    _, caps = KVSettings(keep=100, window=10, layer_weights=tuple(pyramid(4))).shapes(4, 1000)
    assert caps[0] > caps[-1] and abs(sum(caps) / 4 - 90) <= 1


def test_static_decoder_with_compressed_cache_matches_the_hf_path(model):
    ids = _ids(100, seed=3)
    settings = KVSettings(policy="h2o", keep=40, window=8, bits=8)
    hf = model.generate(ids, max_new_tokens=20, do_sample=False, cache=CompressedKVCache(settings, 2))
    from dataclasses import asdict

    engine = DecodeEngine(model, DecodePlan(kv=asdict(settings)), compile=False)
    # the engine's budget follows the 256-token context bucket; a token budget is the same in both
    assert torch.equal(engine.generate(ids, 20), hf)
    assert torch.equal(engine.generate(ids, 20), hf), "a second call reuses and resets the same cache"


def test_fixed_budget_decode_step_exports_and_runs(model):
    ids = _ids(60)
    settings = KVSettings(policy="snapkv", keep=24, window=8, bits=8)
    cache, twin = CompressedKVCache(settings, 2), CompressedKVCache(settings, 2)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
        model(input_ids=ids, cache=twin, use_cache=True)
        program = torch.export.export(FixedBudgetDecodeStep(model, cache), (torch.tensor([[5]]), torch.tensor([60])))
        step = program.module()
        for i, token in enumerate([5, 9, 77, 3]):
            pos = torch.tensor([60 + i])
            out = step(torch.tensor([[token]]), pos)
            ref = model(input_ids=torch.tensor([[token]]), cache=twin, position_ids=pos[None], use_cache=True).logits
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    shapes = {n: b.shape for n, b in program.named_buffers()}
    assert shapes["kv0_store_keys"] == (1, 2, 16, 16) and shapes["kv0_store_keys"] == cache.layers[0].store.keys.shape


def test_compressed_cache_bytes_follow_the_cost_model(smollm2_graph):
    from optpass.cost_models import formulas as F
    from optpass.cost_models.kv_cache import kv_bytes, kv_estimate
    from optpass.cost_models import get_spec

    settings = KVSettings(keep=0.25, bits=8)
    cache = CompressedKVCache(settings, 30, context=4096)
    for layer in cache.layers:
        layer.allocate(1, 3, 64, torch.float32, torch.device("cpu"))
    predicted = F.evaluate(kv_bytes(smollm2_graph, 0.25, 8, window=32), B=1, S_ctx=4096)
    assert abs(cache.nbytes() - predicted) / predicted < 0.05
    full = F.evaluate(kv_bytes(smollm2_graph, 1, None), B=1, S_ctx=4096)
    assert full == 30 * 2 * 3 * 4096 * 64 * 4
    assert cache.nbytes() <= 0.15 * full
    est = kv_estimate(smollm2_graph, get_spec("cpu"), 0.25, 8, 32, 4096)
    assert est.d_latency < 0 and est.d_peak_memory < 0
    assert est.crossover is not None and 16 < est.crossover < 4096, "compression pays only past some context length"


def test_kv_cache_pass_round_trips_through_a_checkpoint(tmp_path):
    import optpass
    from optpass.passes.kv_cache import KVCacheConfig

    base = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2, vocab=128, seed=1)
    optimized = optpass.optimize(base, passes=[KVCacheConfig(policy="h2o", keep=0.5, bits=8)], quality_budget="kl:10")
    record = next(r for r in optimized.optpass_report.passes if r.name == "kv_cache")
    assert record.status == "applied", record.reason
    optpass.save(optimized, tmp_path / "ckpt")
    loaded = optpass.load(tmp_path / "ckpt")
    from optpass.backends.runtime import runtime_plan

    assert runtime_plan(loaded).kv == runtime_plan(optimized).kv is not None
    ids = _ids(64, seed=4)
    assert torch.equal(loaded.generate(ids, max_new_tokens=12, do_sample=False),
                       optimized.generate(ids, max_new_tokens=12, do_sample=False))
