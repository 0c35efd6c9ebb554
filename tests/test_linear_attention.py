"""Local layers (the `linear_attention` pass, sliding_window method): the narrowed mask and the sink + window ring
both compute attention over exactly each row's first `sink` real keys plus the trailing window (checked against a
reference written from the definition, left padding and prompts shorter than the sinks included); a model with
local layers decodes the same tokens through optpass's runtime (ring cache) as through Hugging Face's own loop;
the pass applies within budget with per-layer figures and the KV saving, rolls back with the reason, refuses an
unmeasurable window and an unknown method by name, and survives save / load."""

from __future__ import annotations

import pytest
import torch

import optpass
from optpass.backends.kv import enable_compressed_attention
from optpass.backends.kv.band import banded
from optpass.backends.kv.locality import local_mass
from optpass.backends.kv.ring import RingLayer
from optpass.errors import ConfigError
from optpass.hf_compat import SLIDING, layer_kinds, local_layers
from optpass.models import tiny_llama
from optpass.passes.linear_attention import LinearAttentionConfig, set_local
from tests import model_zoo


def reference_allowed(valid: torch.Tensor, query_pos: list[int], sink: int, window: int) -> torch.Tensor:
    """[B, Q, K] from the definition: key j is real, not after the query, and among the row's first `sink` real
    keys or within `window` of the query."""
    b, k = valid.shape
    out = torch.zeros(b, len(query_pos), k, dtype=torch.bool)
    for r in range(b):
        real = [j for j in range(k) if valid[r, j]]
        sinks = set(real[:sink])
        for qi, p in enumerate(query_pos):
            for j in real:
                out[r, qi, j] = j <= p and (j in sinks or p - j < window)
    return out


def test_banded_mask_follows_the_definition_for_each_mask_convention():
    sink, window, seq = 2, 5, 14
    valid = torch.ones(2, seq, dtype=torch.bool)
    valid[1, :4] = False  # left padding
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
    want = reference_allowed(valid, list(range(seq)), sink, window)
    real_rows = valid[:, :, None]  # padding query rows are never read
    got_bool = banded(causal, seq, seq, sink, window, torch.device("cpu"))[:, 0]
    assert torch.equal(got_bool & real_rows, want & real_rows)
    additive = torch.where(causal, 0.0, torch.finfo(torch.float32).min)
    got_float = banded(additive, seq, seq, sink, window, torch.device("cpu"))[:, 0] == 0
    assert torch.equal(got_float & real_rows, want & real_rows)
    unpadded = banded(None, seq, seq, sink, window, torch.device("cpu"))[0, 0]
    assert torch.equal(unpadded, want[0])
    # a static cache's decode step: query at position 9 of a 20-slot cache whose tail is unused
    static = torch.zeros(1, 1, 1, 20, dtype=torch.bool)
    static[..., :10] = True
    step = banded(static, 1, 20, sink, window, torch.device("cpu"))[0, 0, 0]
    assert step.nonzero().flatten().tolist() == [0, 1, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("prompt_len", [11, 2])  # 2: fewer real tokens than sinks, later tokens become sinks
def test_ring_with_sinks_attends_exactly_to_sinks_and_window(prompt_len):
    torch.manual_seed(0)
    sink, window, heads, dim, steps = 3, 4, 2, 8, 9
    total = prompt_len + steps
    q = torch.randn(2, 4, total, dim)
    k, v = torch.randn(2, heads, total, dim), torch.randn(2, heads, total, dim)
    valid = torch.ones(2, total, dtype=torch.bool)
    if prompt_len > 3:
        valid[1, :3] = False  # left-padded second row
    ring = RingLayer(window, None, 0, 0, sink)
    ring.allocate(2, heads, dim, torch.float32, torch.device("cpu"))
    ring.prefill(q[:, :, :prompt_len], k[:, :, :prompt_len], v[:, :, :prompt_len], valid[:, :prompt_len], 0.5)
    allowed = reference_allowed(valid, list(range(total)), sink, window)
    for t in range(prompt_len, total):
        got = ring.decode(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], 0.5, None)
        mask = allowed[:, None, t:t + 1, :]
        kk, vv = (x.repeat_interleave(2, 1) for x in (k, v))
        logits = (q[:, :, t:t + 1] @ kk.transpose(-1, -2) * 0.5).masked_fill(~mask, float("-inf"))
        want = logits.softmax(-1) @ vv
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_local_layers_give_the_same_logits_through_rings_and_transformers_cache():
    """Prefill + decode steps: optpass's static cache (sink + window rings for local layers) against transformers'
    DynamicCache, where the narrowed mask does the work; and both differ from the unconverted model."""
    from transformers import DynamicCache

    from optpass.backends.kv.cache import static_cache
    model = tiny_llama(layers=3).eval()
    enable_compressed_attention(model)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))

    def run(cache):
        return model_zoo.last_logits_through(model, ids, cache, model_zoo.STEPS)

    with torch.no_grad():
        full = run(DynamicCache(config=model.config))
        set_local(model, {0: (2, 6), 2: (2, 6)})
        assert [k.kind for k in layer_kinds(model.config)] == [SLIDING, "full_attention", SLIDING]
        hf = run(DynamicCache(config=model.config))
        rings = run(static_cache(model.config, 64))
    torch.testing.assert_close(rings, hf, atol=1e-5, rtol=1e-5)
    assert (hf - full).abs().max() > 1e-2, "the window is narrower than the text: local layers change the logits"


def test_local_layers_decode_left_padded_batches_on_the_runtime_as_transformers_does():
    model = tiny_llama(layers=3).eval()
    enable_compressed_attention(model)
    set_local(model, {0: (2, 6), 2: (2, 6)})
    assert_runtime_generates_as_transformers(model, 20)


def assert_runtime_generates_as_transformers(model, prompt: int) -> None:
    """Greedy tokens of a left-padded batch of two: optpass's decode runtime (eager steps) == transformers' loop."""
    from optpass.backends.runtime import DecodePlan, install_runtime

    ids = torch.randint(0, 256, (2, prompt), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, prompt, dtype=torch.long)
    mask[1, :5] = 0
    hf = type(model).generate(model, ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    install_runtime(model, DecodePlan(compiled_step=True, max_cache_len=64))
    model.optpass_runtime.engine._compile = False
    got = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert model.optpass_runtime.fast_calls == 1, model.optpass_runtime.fallbacks
    assert torch.equal(got, hf)


def test_local_mass_is_one_for_a_window_that_hides_nothing_and_ranks_locality():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 64, 8), torch.randn(1, 1, 64, 8)
    assert torch.equal(local_mass(q, k, 0.3, 4, 60), torch.ones(2))
    sharp = local_mass(q * 0 + k.repeat(1, 2, 1, 1), k, 3.0, 0, 1)  # each query matches its own key
    diffuse = local_mass(q * 0, k, 1.0, 0, 1)  # uniform attention over everything seen
    assert (sharp > 0.5).all() and (diffuse < 0.1).all()


def _optimize(model, budget: str, **overrides):
    config = LinearAttentionConfig(**{"window": 32, "sink": 4, "calibration_len": 256, "eval_len": 256, **overrides})
    return optpass.optimize(model, passes=[config], quality_budget=budget)


def test_pass_applies_within_budget_with_layer_figures_and_kv_saving(tmp_path):
    model = tiny_llama(layers=4).eval()
    out = _optimize(model, "ppl:200%")
    record = out.optpass_report.passes[0]
    assert record.status == "applied", record.reason
    local = local_layers(out.config)
    assert local and all(v == (4, 32) for v in local.values())
    layers = record.details["layers"]
    assert set(layers) == {"0", "1", "2", "3"} and all(0 < v["local_mass"] <= 1 for v in layers.values())
    assert {int(i) for i, v in layers.items() if v.get("local")} == set(local)
    kv = record.details["kv_cache_bytes"]
    per_layer_full = kv["full"] / 4
    expected_local = kv["full"] - len(local) * per_layer_full * (1 - 36 / 256)  # rings of 4 + 32 of 256 slots
    assert kv["local"] < kv["full"] and abs(kv["local"] - expected_local) / kv["full"] < 0.02
    assert local_layers(saved_and_loaded(out, tmp_path).config) == local


def saved_and_loaded(model, tmp_path):
    """`optpass.load(optpass.save(model))`, checked to give the same logits on a 200-token text."""
    optpass.save(model, tmp_path / "ckpt")
    loaded = optpass.load(tmp_path / "ckpt")
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    return loaded


def test_a_budget_no_share_meets_rolls_back_with_the_reason():
    out = _optimize(tiny_llama(layers=2).eval(), "kl:1e-12")
    record = out.optpass_report.passes[0]
    assert record.status == "skipped" and "no share of local layers meets the quality budget" in record.reason
    assert not local_layers(out.config)


def test_an_unmeasurable_window_a_lone_full_layer_and_an_unknown_method_are_refused_by_name():
    out = _optimize(tiny_llama(layers=2).eval(), "ppl:10%", window=300)
    record = out.optpass_report.passes[0]
    assert record.status == "skipped" and "cannot be measured" in record.reason
    single = _optimize(tiny_llama(layers=1).eval(), "ppl:200%").optpass_report.passes[0]
    assert single.status == "skipped" and "only 1 full-attention layer" in single.reason
    with pytest.raises(ConfigError, match="method='performer'; known"):
        LinearAttentionConfig(method="performer")
    assert LinearAttentionConfig(method="hedgehog").method == "hedgehog"  # the learned variant: tests/test_hedgehog.py
    with pytest.raises(ConfigError, match="largest first"):
        LinearAttentionConfig(shares=(0.5, 1.0))


def test_the_plan_converts_layers_only_for_a_context_past_the_window():
    from optpass.capture import capture
    from optpass.cost_models.hardware import get_spec
    from optpass.passes.linear_attention import LinearAttentionPass

    graph = capture(tiny_llama(layers=4).eval())
    spec = get_spec("cpu")
    planned = LinearAttentionPass(LinearAttentionConfig(window=32))
    short = planned.candidates(graph, spec)[0]  # the example's few tokens: inside the 4 + 32 span
    assert short.estimate.relative_gain == 0 and short.estimate.d_peak_memory == 0
    graph.context = 4096  # optimize(context=4096)
    long = planned.candidates(graph, spec)[0]
    assert long.params["context"] == 4096 and long.estimate.relative_gain > 0 and long.estimate.d_peak_memory < 0
