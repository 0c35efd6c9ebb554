"""The learned variant of the `linear_attention` pass (method="hedgehog"): the sliding-window + linear-attention
hybrid against a float64 reference written from its definition (explicit masked softmax over sinks + window and
explicit linear sums over every other real key; GQA, left padding); the recurrent decode layer against the
parallel form (with and without rollback slack); attention transfer lowering the layer's output error from the
identity start; and, on a tiny Llama, the pass itself: routing in prefill and both decode loops, the budget's
choice and rollback, per-layer figures, and save / load."""

from __future__ import annotations

import pytest
import torch

from optpass.backends.kv import enable_compressed_attention
from optpass.backends.linear.feature_map import HedgehogMaps, maps_of
from optpass.backends.linear.fit import fit_layer, record_attention, transfer_error
from optpass.backends.linear.hybrid import HybridLayer, parallel
from optpass.errors import ConfigError
from optpass.hf_compat import linear_layers, local_layers
from optpass.models import tiny_llama
from optpass.passes.linear_attention import LinearAttentionConfig, set_hybrid
from tests.test_linear_attention import _optimize as optimize_local
from tests.test_linear_attention import assert_runtime_generates_as_transformers, reference_allowed, saved_and_loaded


def random_maps(heads: int, kv_heads: int, dim: int, seed: int = 0) -> HedgehogMaps:
    """Maps away from the identity start, with different gains per head."""
    g = torch.Generator().manual_seed(seed)
    maps = HedgehogMaps(heads, kv_heads, dim)
    with torch.no_grad():
        for p in maps.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return maps


def phi64(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    proj = x.double() @ w.double()
    return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], -1)


def reference(q, k, v, valid, sink, window, maps, scale):
    """[B, Hq, S, D] float64, one query at a time from the definition."""
    b, hq, s, d = q.shape
    g = hq // k.shape[1]
    allowed = reference_allowed(valid, list(range(s)), s, s)  # causal + real keys
    near = reference_allowed(valid, list(range(s)), sink, window)
    out = torch.zeros(b, hq, s, d, dtype=torch.float64)
    gain = maps.log_gain.double().exp()
    for r in range(b):
        for h in range(hq):
            kh = h // g
            for i in range(s):
                if not valid[r, i]:
                    continue
                n = near[r, i].nonzero().flatten()
                f = (allowed[r, i] & ~near[r, i]).nonzero().flatten()
                logits = q[r, h, i].double() @ k[r, kh, n].double().T * scale
                e = (logits - logits.max()).exp()
                lin = phi64(k[r, kh, f], maps.key_weight[kh]) @ phi64(q[r, h, i], maps.query_weight[h]) * gain[h]
                num = e @ v[r, kh, n].double() + lin @ v[r, kh, f].double()
                out[r, h, i] = num / (e.sum() + lin.sum())
    return out


def inputs(batch=2, heads=4, kv_heads=2, seq=23, dim=8, pad=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, h, seq, dim, generator=g) for h in (heads, kv_heads, kv_heads))
    valid = torch.ones(batch, seq, dtype=torch.bool)
    valid[1:, :pad] = False  # the second row is left-padded
    return q, k, v, valid


def test_parallel_form_matches_the_float64_definition_with_gqa_and_left_padding():
    q, k, v, valid = inputs()
    maps = random_maps(4, 2, 8)
    sink, window, scale = 2, 5, 0.4
    mask = torch.ones(23, 23, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    additive = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    want = reference(q, k, v, valid, sink, window, maps, scale)
    real = valid[:, None, :, None]
    for m in (mask, additive):
        got = parallel(q, k, v, m, sink, window, maps, scale).transpose(1, 2)
        assert torch.isfinite(got).all(), "padding rows must not become NaN"
        torch.testing.assert_close(got.double() * real, want * real, atol=2e-5, rtol=1e-5)
    # no mask (causal, unpadded), and query chunks smaller than the prompt give the same rows
    import optpass.backends.linear.hybrid as hybrid
    first = parallel(q[:1], k[:1], v[:1], None, sink, window, maps, scale)
    old, hybrid.CHUNK_ELEMENTS = hybrid.CHUNK_ELEMENTS, 4 * 23 * 3
    try:
        chunked = parallel(q[:1], k[:1], v[:1], None, sink, window, maps, scale)
    finally:
        hybrid.CHUNK_ELEMENTS = old
    torch.testing.assert_close(first.transpose(1, 2).double(), want[:1], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, first, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("slack,prompt", [(0, 15), (3, 15), (0, 3)])  # 3: a prompt shorter than the sinks + pad
def test_recurrent_decode_equals_the_parallel_form(slack, prompt):
    q, k, v, valid = inputs(seq=30, pad=2)
    maps = random_maps(4, 2, 8, seed=1)
    sink, window, scale = 3, 4, 0.5
    mask = torch.ones(30, 30, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    want = parallel(q, k, v, mask, sink, window, maps, scale)  # [B, S, Hq, D]
    layer = HybridLayer(window, None, 0, slack, sink)
    layer.allocate(2, 2, 8, torch.float32, torch.device("cpu"))
    layer.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], valid[:, :prompt], scale, maps=maps)
    for t in range(prompt, 30):
        got = layer.decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], scale, None, maps=maps)
        torch.testing.assert_close(got[:, :, 0], want[:, t], atol=1e-5, rtol=1e-5)
    assert layer.norm.sum() > 0, "tokens left the window: the linear state holds them"
    if slack:  # roll back 2 tokens (a rejected draft) and decode different ones: still the parallel form's rows
        layer.crop(-2)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, 28:], v2[:, :, 28:] = -k[:, :, 28:], v[:, :, 28:] * 2
        want2 = parallel(q, k2, v2, mask, sink, window, maps, scale)
        for t in (28, 29):
            got = layer.decode(q[:, :, t:t + 1], k2[:, :, t:t + 1], v2[:, :, t:t + 1], scale, None, maps=maps)
            torch.testing.assert_close(got[:, :, 0], want2[:, t], atol=1e-5, rtol=1e-5)


def test_the_fitting_chunk_with_its_past_as_a_state_equals_the_parallel_rows():
    from optpass.backends.linear.fit import Record, _hybrid
    q, k, v, _ = inputs(batch=1, seq=40)
    maps = random_maps(4, 2, 8, seed=3)
    want = parallel(q, k, v, None, 2, 6, maps, 0.4).transpose(1, 2)  # [1, Hq, S, D]
    got = _hybrid(Record(q, k, v, 0.4), maps, 20, 32, 2, 6)
    torch.testing.assert_close(got, want[:, :, 20:32], atol=1e-5, rtol=1e-5)


def test_state_is_constant_size_and_counted():
    small, large = HybridLayer(8, sink=4), HybridLayer(8, sink=4)
    small.allocate(1, 2, 16, torch.float32, torch.device("cpu"))
    large.allocate(1, 2, 16, torch.float32, torch.device("cpu"))
    assert small.nbytes() == large.nbytes() > 0
    assert "state" in small.tensors() and small.tensors()["state"].shape == (1, 2, 32, 16)


def test_attention_transfer_lowers_the_output_error_from_the_identity_start():
    model = tiny_llama(layers=2).eval()
    enable_compressed_attention(model)
    ids = torch.randint(0, 256, (1, 192), generator=torch.Generator().manual_seed(2))
    records = record_attention(model, ids)
    assert set(records) == {0, 1} and records[0].value.shape == (1, 2, 192, 16)
    fitted = fit_layer(records[1], sink=2, window=16, steps=60)
    assert fitted.error_before > 0 and fitted.error_after < 0.7 * fitted.error_before, fitted
    assert transfer_error(records[1], fitted.maps, 2, 16) == pytest.approx(fitted.error_after)
    assert fitted.seconds > 0


def _convert(model, layers, sink=2, window=16, seed=0):
    enable_compressed_attention(model)
    cfg = model.config
    maps = {i: random_maps(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                           seed + i) for i in layers}
    set_hybrid(model, {i: (sink, window) for i in layers}, maps)
    return maps


def test_converted_layers_give_the_same_logits_through_hybrid_caches_and_transformers_cache():
    """Prefill + decode steps: optpass's static cache (HybridLayer for converted layers) against transformers'
    DynamicCache, where the parallel form attends over the full cache; and both differ from the unconverted model
    and from the plain sliding window (the linear part contributes)."""
    from transformers import DynamicCache

    from optpass.backends.kv.cache import static_cache
    from optpass.passes.linear_attention import set_local
    from tests import model_zoo
    model = tiny_llama(layers=3).eval()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))

    def run(cache):
        return model_zoo.last_logits_through(model, ids, cache, model_zoo.STEPS)

    with torch.no_grad():
        enable_compressed_attention(model)
        full = run(DynamicCache(config=model.config))
        set_local(model, {0: (2, 16), 2: (2, 16)})
        window_only = run(DynamicCache(config=model.config))
        _convert(model, [0, 2])
        assert linear_layers(model.config) == {0, 2}
        hf = run(DynamicCache(config=model.config))
        cache = static_cache(model.config, 64)
        hybrid = run(cache)
    assert isinstance(cache.layers[0], HybridLayer) and not isinstance(cache.layers[1], HybridLayer)
    torch.testing.assert_close(hybrid, hf, atol=1e-5, rtol=1e-5)
    assert (hf - full).abs().max() > 1e-3 and (hf - window_only).abs().max() > 1e-3


def test_generate_through_the_runtime_matches_transformers_loop_with_left_padding():
    model = tiny_llama(layers=3).eval()
    _convert(model, [0, 2])
    assert_runtime_generates_as_transformers(model, 40)  # 40 > 2 sinks + 16 window: linear state in use


def _optimize(model, budget: str):
    return optimize_local(model, budget, method="hedgehog", fit_steps=40)


def test_hedgehog_pass_applies_within_budget_reports_layers_and_survives_save_load(tmp_path):
    model = tiny_llama(layers=4).eval()
    out = _optimize(model, "ppl:200%")
    record = out.optpass_report.passes[0]
    assert record.status == "applied", record.reason
    converted = linear_layers(out.config)
    assert converted and set(local_layers(out.config)) == converted
    layers = record.details["layers"]
    assert set(layers) == {"0", "1", "2", "3"}
    for v in layers.values():
        assert v["error_after"] < v["error_before"] and v["fit_s"] > 0
    assert {int(i) for i, v in layers.items() if v.get("converted")} == converted
    kv = record.details["kv_cache_bytes"]
    hybrid = HybridLayer(32, sink=4)
    hybrid.allocate(1, 2, 16, torch.float32, torch.device("cpu"))  # tiny_llama: 2 KV heads of 16
    per_layer_full = kv["full"] / 4
    assert kv["context"] == 256 and kv["hybrid"] == kv["full"] - len(converted) * (per_layer_full - hybrid.nbytes())
    for m in out.modules():
        if getattr(m, "layer_idx", None) in converted and hasattr(m, "q_proj"):
            assert maps_of(m) is not None
    assert linear_layers(saved_and_loaded(out, tmp_path).config) == converted


def test_hedgehog_pass_rolls_back_with_the_reason_under_an_impossible_budget():
    out = _optimize(tiny_llama(layers=2).eval(), "kl:1e-12")
    record = out.optpass_report.passes[0]
    assert record.status == "skipped" and "no share of hybrid layers meets the quality budget" in record.reason
    assert "error" in record.reason  # the fitted errors are in the reason
    assert not linear_layers(out.config) and not local_layers(out.config)
    assert all(maps_of(m) is None for m in out.modules())


def test_hedgehog_config_is_validated():
    with pytest.raises(ConfigError, match="fit_steps"):
        LinearAttentionConfig(method="hedgehog", fit_steps=0)
    with pytest.raises(ConfigError, match="known"):
        LinearAttentionConfig(method="performer")
