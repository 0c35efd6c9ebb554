"""Block-sparse attention: every pattern's layout is executed exactly (the lowering equals dense attention
restricted to the kept blocks, with padding, ragged lengths and grouped heads), the search picks the cheapest
pattern that reaches the coverage target, the model's attention runs sparse only for long prefills from an empty
cache, and the pass applies within budget, rolls back with the reason, and survives save / load and the CLI."""

from __future__ import annotations

import pytest
import torch

import optpass
from optpass.backends.sparse import LayerSparsity, block_sparse_attention
from optpass.backends.sparse import attend
from optpass.backends.sparse.layout import clip_causal, dense_mask
from optpass.backends.sparse.patterns import PATTERNS, make_pattern
from optpass.backends.sparse.search import HeadScores, block_mass, choose, coverage
from optpass.models import tiny_llama
from optpass.passes.sparse_attention import ATTRIBUTE, SparseAttentionConfig, attention_modules, install

# one spec per registered pattern (the matrix below must cover every pattern)
SPECS = {
    "dense": {"name": "dense"},
    "a_shape": {"name": "a_shape", "sink": 32, "window": 64},
    "block_topp": {"name": "block_topp", "p": 0.7, "samples": 4},
    "vertical_slash": {"name": "vertical_slash", "vertical": 12, "slash": 4, "last": 16},
    "local_2d": {"name": "local_2d", "height": 10, "width": 25, "radius": 3},
}
SEQ, BLOCK = 250, 32  # ragged: 250 is not a multiple of 32


def test_every_registered_pattern_is_in_the_matrix():
    assert set(SPECS) == set(PATTERNS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_lowering_equals_dense_attention_on_the_kept_blocks(name, cpu_lowering):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, SEQ, 16), torch.randn(2, 2, SEQ, 16), torch.randn(2, 2, SEQ, 16)
    causal = name != "local_2d"
    pattern = make_pattern(SPECS[name])
    keep = pattern.block_mask(q, k.repeat_interleave(2, 1), BLOCK).expand(2, 4, -1, -1)
    out = block_sparse_attention(q, k, v, keep, BLOCK, 0.25, causal=causal)
    mask = dense_mask(clip_causal(keep) if causal else keep, SEQ, SEQ, BLOCK, causal)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           attn_mask=mask, scale=0.25)
    rows = mask.any(-1)
    torch.testing.assert_close(out[rows], ref[rows], **cpu_lowering)
    if name != "dense":  # a sparse pattern really drops blocks (else the test would not see a wrong layout)
        assert not mask[rows[..., None].expand_as(mask)].all()


def test_block_mass_is_the_exact_attention_pooled_over_blocks():
    torch.manual_seed(1)
    q, k = torch.randn(1, 2, 100, 8), torch.randn(1, 1, 100, 8)
    mass = block_mass(q, k, 32, 8 ** -0.5, chunk_blocks=2)
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2))[0] * 8 ** -0.5
    probs = scores.masked_fill(torch.ones(100, 100, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    for qb in range(4):
        rows = probs[:, qb * 32:(qb + 1) * 32]
        for kb in range(4):
            want = rows[..., kb * 32:(kb + 1) * 32].sum(-1).mean(-1)
            assert torch.allclose(mass[:, qb, kb], want, atol=1e-6)
    every_block = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    assert torch.allclose(coverage(mass, every_block), torch.ones(2))


def test_choice_is_the_cheapest_pattern_reaching_the_target_else_dense():
    cands = [{"name": "a_shape", "window": 64}, {"name": "block_topp", "p": 0.9}]
    scores = HeadScores(cands, coverage=torch.tensor([[0.97, 0.80], [0.99, 0.99]]),
                        density=torch.tensor([[0.1, 0.1], [0.3, 0.2]]))
    specs, covs, dens = choose(scores, 0.95)
    assert specs == [cands[0], cands[1]] and dens == pytest.approx([0.1, 0.2])
    specs, _, dens = choose(scores, 0.995)
    assert specs == [{"name": "dense"}] * 2 and dens == [1.0, 1.0]


def _count_sparse_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = attend.block_sparse_attention

    def counted(*args, **kwargs):
        calls.append(args[0].shape[2])
        return real(*args, **kwargs)
    monkeypatch.setattr(attend, "block_sparse_attention", counted)
    return calls


def _plan(model, spec, min_len):
    heads = model.config.num_attention_heads
    return {i: LayerSparsity(tuple(dict(spec) for _ in range(heads)), min_len, 16) for i in attention_modules(model)}


@torch.no_grad()
def test_a_dense_layout_reproduces_the_model_and_short_prefills_stay_dense(monkeypatch, cpu_lowering):
    from optpass.backends.kv import enable_compressed_attention

    model = tiny_llama(layers=2).eval()
    ids = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(2))
    want = model(input_ids=ids).logits
    enable_compressed_attention(model)
    calls = _count_sparse_calls(monkeypatch)
    install(model, _plan(model, {"name": "dense"}, 64))
    torch.testing.assert_close(model(input_ids=ids).logits, want, **cpu_lowering)
    assert calls == [90, 90]  # both layers ran the sparse lowering
    calls.clear()
    model(input_ids=ids[:, :63])  # below min_len: dense SDPA
    assert calls == []
    out = model.generate(ids, max_new_tokens=3, do_sample=False)  # prefill sparse, decode steps dense
    assert calls == [90, 90] and out.shape[1] == 93


@torch.no_grad()
def test_left_padded_rows_match_their_unpadded_run(monkeypatch):
    """Each left-padded row runs on its own unpadded slice: with a window layout (whose blocks and sinks depend on
    where the row starts) a padded batch gives each row what it gives alone."""
    from optpass.backends.kv import enable_compressed_attention

    model = tiny_llama(layers=2).eval()
    enable_compressed_attention(model)
    calls = _count_sparse_calls(monkeypatch)
    install(model, _plan(model, {"name": "a_shape", "sink": 16, "window": 32}, 2))
    ids = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 100, dtype=torch.long)
    mask[1, :23] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    alone = model(input_ids=ids[1:, 23:]).logits
    assert calls and torch.allclose(batch[1, 23:], alone[0], atol=1e-4)


def _optimize(model, budget: str, **overrides):
    config = SparseAttentionConfig(**{"calibration_len": 256, "eval_len": 256, "block": 32, "context": 512,
                                      **overrides})
    return optpass.optimize(model, passes=[config], quality_budget=budget)


def test_pass_applies_within_budget_and_reports_its_crossover_and_layers(tmp_path):
    model = tiny_llama(layers=2).eval()
    out = _optimize(model, "ppl:50%", patterns=("a_shape",))  # random weights attend diffusely: windows only
    record = out.optpass_report.passes[0]
    assert record.status == "applied", record.reason
    assert "stay dense" in record.reason and "below the cost model's crossover" in record.reason
    layers = record.details["layers"]
    assert set(layers) == {"0", "1"} and all(0 < v["density"] <= 1 and 0 < v["coverage"] <= 1 for v in layers.values())
    assert record.details["tried"] and all("quality" in t for t in record.details["tried"])
    plans = {i: getattr(m, ATTRIBUTE) for i, m in attention_modules(out).items() if hasattr(m, ATTRIBUTE)}
    assert plans and min(p.min_len for p in plans.values()) == record.details["sparse_from_tokens"]
    optpass.save(out, tmp_path / "ckpt")
    loaded = optpass.load(tmp_path / "ckpt")
    again = {i: getattr(m, ATTRIBUTE) for i, m in attention_modules(loaded).items() if hasattr(m, ATTRIBUTE)}
    assert again == plans
    ids = torch.randint(0, 256, (1, 400), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(out(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-5)


def test_a_budget_no_coverage_target_meets_rolls_back_with_the_reason():
    model = tiny_llama(layers=2).eval()
    out = _optimize(model, "kl:1e-12")
    record = out.optpass_report.passes[0]
    assert record.status == "skipped" and "no coverage target meets the quality budget" in record.reason
    assert not any(hasattr(m, ATTRIBUTE) for m in attention_modules(out).values())


def test_a_coverage_every_head_needs_dense_for_is_reported_as_such():
    """coverage 1.0: the search keeps every key block of every head (density 1); the report says
    that (not "the cost model finds no crossover", which is another cause)."""
    model = tiny_llama(layers=2).eval()
    out = _optimize(model, "ppl:50%", coverage=1.0, patterns=("block_topp",))
    record = out.optpass_report.passes[0]
    assert record.status == "skipped"
    assert "every head of the full-attention layers [0, 1] needs all its key blocks" in record.reason, record.details["layers"]
    assert all(v["density"] == 1.0 for v in record.details["layers"].values())
    assert not any(hasattr(m, ATTRIBUTE) for m in attention_modules(out).values())


def test_short_planning_context_is_not_chosen_under_auto_with_the_reason():
    from optpass.cost_models import get_spec
    from optpass.passes.sparse_attention import SparseAttentionPass

    graph = optpass.capture(tiny_llama(layers=2).eval())
    short = SparseAttentionPass(SparseAttentionConfig(context=64)).candidates(graph, get_spec("cpu"))[0]
    long = SparseAttentionPass(SparseAttentionConfig(context=8192)).candidates(graph, get_spec("cpu"))[0]
    print(short.estimate, long.estimate)
    assert short.estimate.relative_gain < long.estimate.relative_gain


def test_cli_round_trip_keeps_the_patterns(tmp_path, tiny_llama):
    from optpass.cli import main

    tiny_llama.save_pretrained(tmp_path / "hf")
    assert main(["optimize", str(tmp_path / "hf"), "--passes", "sparse_attention", "--quality-budget", "ppl:100%",
                 "-o", str(tmp_path / "out")]) == 0
    loaded = optpass.load(tmp_path / "out")
    plans = [getattr(m, ATTRIBUTE, None) for m in attention_modules(loaded).values()]
    assert any(p is not None for p in plans)
    assert all(isinstance(h, dict) and h["name"] in PATTERNS for p in plans if p for h in p.heads)


def test_the_lowering_stays_exact_past_dynamos_recompile_limit(cpu_lowering):
    """Each (causal, block, scale) gets its own compiled FlexAttention, and one past the recompile limit a fresh
    one: a function at the limit ran FlexAttention eagerly, which attends to every key its mask function allows
    (dense, silently)."""
    import torch._dynamo.config as dynamo_config
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    seq, block = 64, 16
    keep = (torch.rand(1, 1, 4, 4, generator=g) < 0.5) | torch.eye(4, dtype=torch.bool)
    with dynamo_config.patch(recompile_limit=1):  # config.patch restores it (monkeypatch would delete the key)
        # three keys, then the first key again at another batch (a shape recompile of its own function)
        for dim, causal, batch in ((8, False, 1), (16, False, 1), (16, True, 1), (8, False, 3)):
            q, k, v = (torch.randn(batch, 2, seq, dim, generator=g) for _ in range(3))
            layout = clip_causal(keep) if causal else keep
            out = block_sparse_attention(q, k, v, keep, block, dim ** -0.5, causal=causal)
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(layout, seq, seq, block, causal=causal))
            torch.testing.assert_close(out, ref, **cpu_lowering)
