"""Self-speculative drafting: the model drafts with some blocks skipped and verifies with all of them, on one
cache. Lossless (greedy output token for token the model's own, batch 1 and 4 with left padding, int8 weights
compiled, a compressed cache), no drafted entry left in the cache, the teacher-forced acceptance against an
independent block-removal reference, and the `speculative` pass's search, refusal and checkpoint."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

import optpass
from optpass.backends.kv import KVSettings
from optpass.backends.runtime import DecodeEngine, DecodePlan
from optpass.backends.runtime.self_draft import acceptance, best_setting, own_continuations, tokens_per_verify
from optpass.models import tiny_llama
from optpass.passes.layer_skip import decoder_layers, remove_blocks
from optpass.passes.speculative import SpeculativeConfig
from tests import model_zoo
from tests.test_speculative import _forward_greedy, _hf_greedy, _repeating_prompts, check_left_padded_batch_of_four


def _plan(layers: list[int], draft: int = 3, **extra) -> DecodePlan:
    return DecodePlan(compiled_step=True, max_cache_len=256,
                      proposer={"kind": "self_draft", "draft": draft, "layers": layers}, **extra)


@pytest.mark.parametrize("build", [lambda: tiny_llama(layers=4), model_zoo.gemma3], ids=["llama", "gemma3-ring"])
def test_greedy_self_drafting_is_token_for_token_the_models_own(build):
    """20 prompts, batch 1, float64 (see test_speculative); gemma3's 8-slot ring wraps and rolls back both the
    drafting steps' writes and rejected drafts."""
    model = build().eval().double()
    engine = DecodeEngine(model, _plan([len(decoder_layers(model)) - 1]), compile=False)
    accepted = verifies = 0
    for ids in _repeating_prompts(20):
        assert torch.equal(engine.generate(ids, 24), _forward_greedy(model, ids, 24)), ids
        accepted += engine.last_timing["accepted_drafts"]
        verifies += engine.last_timing["verify_steps"]
    assert verifies > 0 and 0 < accepted < 3 * verifies  # drafts accepted, and some rejected


def test_no_drafted_entry_survives_in_the_cache():
    """After a call, every cached position holds what plain decoding cached there: the drafting steps' writes
    (computed without the skipped blocks) were cropped and the verify rewrote those positions."""
    model = tiny_llama(layers=4).eval().double()
    ids = _repeating_prompts(1, seed=2)[0]
    drafting = DecodeEngine(model, _plan([0, 3]), compile=False)
    plain = DecodeEngine(model, DecodePlan(compiled_step=True, max_cache_len=256), compile=False)
    out = drafting.generate(ids, 30)
    assert torch.equal(out, plain.generate(ids, 30)) and drafting.last_timing["verify_steps"] > 0
    filled = out.shape[1] - 1  # every emitted token but the last went through a step
    assert not any("forward" in b.__dict__ for b in decoder_layers(model))  # the switches were taken out
    for mine, theirs in zip(drafting.cache.layers, plain.cache.layers):
        assert int(mine.cumulative_length) == int(theirs.cumulative_length) == filled
        torch.testing.assert_close(mine.keys[:, :, :filled], theirs.keys[:, :, :filled], rtol=0, atol=1e-10)
        torch.testing.assert_close(mine.values[:, :, :filled], theirs.values[:, :, :filled], rtol=0, atol=1e-10)


def test_batch_of_four_with_left_padding_matches_per_prompt_runs():
    model = tiny_llama(layers=4).eval()
    engine = DecodeEngine(model, _plan([3], draft=1), compile=False)  # 4 rows x (1 + 1) within the 8-row budget
    check_left_padded_batch_of_four(model, engine)


def test_compiled_self_drafting_with_int8_weights_matches_plain_decoding():
    from optpass.passes.quantize import QuantizeConfig

    model = optpass.optimize(tiny_llama(layers=4), passes=[QuantizeConfig(weights="int8")], quality_budget=None)
    ids = _repeating_prompts(1)[0]
    plain = DecodeEngine(model, DecodePlan(compiled_step=True, max_cache_len=256)).generate(ids, 24)
    engine = DecodeEngine(model, _plan([3]))
    assert torch.equal(engine.generate(ids, 24), plain)
    assert engine.last_timing["verify_steps"] > 0


def test_self_drafting_on_a_compressed_cache_is_plain_decoding_on_it():
    """The compressed cache evicts as the drafting steps write: its state is saved before them and put back."""
    model = tiny_llama(layers=4).eval().double()
    kv = asdict(KVSettings(policy="snapkv", keep=12, window=4, sink=2, bits=8))
    drafting = DecodeEngine(model, _plan([3], kv=kv), compile=False)
    plain = DecodeEngine(model, DecodePlan(compiled_step=True, max_cache_len=256, kv=kv), compile=False)
    verifies = 0
    for ids in _repeating_prompts(8, seed=4):
        assert torch.equal(drafting.generate(ids, 24), plain.generate(ids, 24)), ids
        verifies += drafting.last_timing["verify_steps"]
    assert verifies > 0


@torch.no_grad()
def test_acceptance_is_the_agreement_of_the_model_without_those_blocks():
    """Reference: the blocks replaced by `RemovedBlock` (the static-removal pass's rewrite), argmax compared with
    the full model's on the unpadded positions."""
    model = tiny_llama(layers=4).eval()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    batches = [{"input_ids": ids, "attention_mask": mask}]
    order = [2, 0, 3, 1]
    got = acceptance(model, batches, order, [1, 3])
    later = acceptance(model, batches, order, [1, 3], first=20)  # only the positions from 20 on are scored
    full = model(**batches[0]).logits.argmax(-1)
    scored = mask.bool().clone()
    scored[:, :20] = False
    for count in (1, 3):
        undo = remove_blocks(model, order[:count])
        try:
            skipped = model(**batches[0]).logits.argmax(-1)
        finally:
            undo()
        assert got[count] == pytest.approx(float(((skipped == full) & mask.bool()).sum() / mask.sum()))
        assert later[count] == pytest.approx(float(((skipped == full) & scored).sum() / scored.sum()))
    assert torch.equal(model(**batches[0]).logits.argmax(-1), full)  # the blocks run again afterwards
    assert not any("forward" in b.__dict__ or "forced_skip" in b.__dict__ for b in decoder_layers(model))


def test_own_continuations_are_the_models_greedy_tokens():
    model = tiny_llama(layers=2).eval()
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(2))
    (got,) = own_continuations(model, [{"input_ids": ids[:1]}, {"input_ids": ids[1:]}], prompt=12, new=6)
    assert got["input_ids"].shape == (2, 18) and bool(got["attention_mask"].all())  # one batch of both prompts
    assert torch.equal(got["input_ids"], _forward_greedy(model, ids[:, :12], 6))


def test_tokens_per_verify_and_the_best_setting():
    assert tokens_per_verify(0.5, 3) == pytest.approx((1 - 0.5 ** 4) / (1 - 0.5))
    assert tokens_per_verify(1.0, 4) == 5.0
    best, table = best_setting({2: 0.9, 6: 0.4}, [1, 4], draft_cost=lambda n: 1 - n / 8, verify_cost=lambda k: 1.2)
    assert len(table) == 4
    # skip 2, draft 4: 4.095 tokens for 4 * 0.75 + 1.2 = 4.2 steps; every other setting is lower
    assert (best.skipped, best.draft) == (2, 4) and best.speedup == pytest.approx(4.0951 / 4.2, rel=1e-4)


def test_pass_refuses_self_drafting_that_does_not_pay_with_the_measured_acceptance(monkeypatch):
    """A drafting step priced as a full step can never pay (k + 1 tokens at most, for k steps + a verify >= 1)."""
    from optpass.passes import speculative

    monkeypatch.setattr(speculative, "draft_step_cost", lambda *args: 1.0)
    model = optpass.optimize(tiny_llama(layers=8), passes=[SpeculativeConfig(proposer="self_draft", draft=3)],
                             quality_budget=None)
    record = next(r for r in model.optpass_report.passes if r.name == "speculative")
    search = record.details["self_draft"]
    chosen = search["chosen"]
    assert chosen["speedup"] <= 1 and 0 <= chosen["alpha"] <= 1
    assert record.status == "skipped" and "self-drafting does not pay here" in record.reason
    assert f"accepted {chosen['alpha']:.0%} per token" in record.reason
    assert set(search["acceptance"]) == {"1", "2", "3", "4"}  # shares 1/8 .. 1/2 of 8 blocks
    assert sorted(search["skip_order"]) == list(range(8))
    assert not hasattr(model, "optpass_runtime")  # nothing installed


def test_pass_applies_self_drafting_where_it_pays_and_the_checkpoint_keeps_it(monkeypatch, tmp_path):
    """With drafting steps priced near zero every setting pays: the pass plans the searched skip set, checks
    losslessness, and generate() drafts with it, before and after a checkpoint round trip."""
    from optpass.passes import speculative

    monkeypatch.setattr(speculative, "draft_step_cost", lambda *args: 0.01)
    model = optpass.optimize(tiny_llama(layers=8), passes=[SpeculativeConfig(proposer="self_draft", draft=3)],
                             quality_budget=None)
    record = next(r for r in model.optpass_report.passes if r.name == "speculative")
    assert record.status == "applied", record.reason
    proposer = model.optpass_runtime.plan.proposer
    chosen = record.details["self_draft"]["chosen"]
    assert proposer["kind"] == "self_draft" and proposer["layers"] == chosen["layers"] and proposer["draft"] == chosen["draft"]
    assert len(chosen["layers"]) == chosen["skipped"]
    ids = _repeating_prompts(1, seed=6)[0]
    want = _hf_greedy(model, ids, 16)
    for m in (model, optpass.load(optpass.save(model, tmp_path / "ckpt") or tmp_path / "ckpt")):
        m.optpass_runtime.engine._compile = False
        assert m.optpass_runtime.plan.proposer == proposer
        assert torch.equal(m.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None), want)
        assert m.optpass_runtime.engine.last_timing["verify_steps"] > 0


def test_an_ungated_plan_drafts_at_every_step():
    """`"gated": False` (benchmarks measure a drafter's acceptance with it): every step verifies a draft, even one
    whose measured cost says drafting cannot pay."""
    model = tiny_llama(layers=4).eval()
    plan = DecodePlan(compiled_step=True, max_cache_len=256,
                      proposer={"kind": "self_draft", "draft": 2, "layers": [3], "verify_cost": 9.0, "gated": False})
    engine = DecodeEngine(model, plan, compile=False)
    engine.generate(_repeating_prompts(1)[0], 20)
    timing = engine.last_timing
    # each iteration is one verify (emitting accepted + 1); only the last token needs no step
    assert timing["verify_steps"] + timing["accepted_drafts"] >= timing["decode_steps"] - 1
