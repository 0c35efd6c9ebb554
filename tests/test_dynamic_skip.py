"""Dynamic layer skipping: a monotone per-position schedule computes the same thing token by token through a KV
cache as in one masked forward (so no key or value ever needs recomputing), at batch 4 with left padding on
transformers' loop and on optpass's runtime (eager and compiled), skips the blocks' work once every row is past
their threshold, and goes through the pass manager (budget, unmeasurable schedules refused, save / load)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import optpass
from optpass.backends.runtime import DecodeEngine, DecodePlan
from optpass.backends.skip_schedule import compute_fraction, install_schedule, ramp, scheduled, stage
from optpass.models import tiny_llama
from optpass.passes.dynamic_skip import DynamicSkipConfig
from optpass.passes.layer_skip import decoder_layers

SCHEDULE = {2: 10, 4: 14, 1: 18}  # block: first skipped position


def _model(layers: int = 6):
    model = tiny_llama(layers=layers, seed=3)
    install_schedule(decoder_layers(model), SCHEDULE)
    return model


def _left_padded(batch: int = 4, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 3, 5, 1)[:batch]):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def test_token_by_token_through_a_cache_equals_one_masked_forward():
    """The cache path skips blocks outright (their layers stop growing); the one-forward path runs every block and
    keeps the input where a token is past the threshold. Equal logits = no token ever needed a missing entry."""
    model = _model()
    ids = torch.randint(0, 256, (1, 28), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits
    cache = DynamicCache(config=model.config)
    steps = [model(ids[:, i:i + 1], cache=cache, use_cache=True).logits[:, -1] for i in range(ids.shape[1])]
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-4, atol=1e-4)
    plain = tiny_llama(layers=6, seed=3)(ids).logits
    torch.testing.assert_close(full[:, :10], plain[:, :10])  # before the first threshold: the model itself
    assert (full[:, 11:] - plain[:, 11:]).abs().amax() > 1e-3  # after it: a shallower model
    # a skipped block's cache stops at its threshold: nothing was written (or recomputed) past it
    assert cache.layers[2].keys.shape[-2] == 10 and cache.layers[0].keys.shape[-2] == 28


@torch.no_grad()
def test_batch_of_four_left_padded_decodes_the_same_on_every_path():
    """transformers' loop (DynamicCache), optpass's runtime eager and compiled (static cache, one graph per
    stage), and the teacher-forced masked forward all give the same greedy tokens."""
    model = _model()
    ids, mask = _left_padded()
    new = 14
    hf = type(model).generate(model, ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    plan = DecodePlan(compiled_step=True, max_cache_len=64, skip={str(k): v for k, v in SCHEDULE.items()})
    eager = DecodeEngine(model, plan, compile=False).generate(ids, new, mask)
    assert torch.equal(eager, hf)
    full_mask = torch.cat([mask, torch.ones(4, new, dtype=mask.dtype)], 1)
    forced = model(hf, attention_mask=full_mask, position_ids=_positions(full_mask)).logits.argmax(-1)
    assert torch.equal(forced[:, ids.shape[1] - 1:-1], hf[:, ids.shape[1]:])
    compiled = DecodeEngine(model, plan)
    assert torch.equal(compiled.generate(ids, new, mask), hf)
    assert {stage for _, stage in compiled._buckets[next(iter(compiled._buckets))][1]} == {0, 1, 2, 3}
    assert all(not b.forced_skip for b in decoder_layers(model) if hasattr(b, "forced_skip"))  # reset after


@torch.no_grad()
def test_a_block_every_row_is_past_does_not_run():
    model = _model()
    calls = {i: 0 for i in SCHEDULE}
    for i in SCHEDULE:
        decoder_layers(model)[i].mlp.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids, mask = _left_padded()
    plan = DecodePlan(compiled_step=True, max_cache_len=64, skip={str(k): v for k, v in SCHEDULE.items()})
    DecodeEngine(model, plan, compile=False).generate(ids, 16, mask)
    # rows' first positions are 12 - pad; block 2 (from 10) runs in the prefill and until the most padded row
    # (7 real tokens) reaches position 10: steps at positions >= 7 .. 9 of that row, i.e. 3 steps
    assert calls[2] == 1 + 3
    assert calls[1] == 1 + (18 - 7)  # block 1 (from 18): 11 steps until every row is past 18
    drafting = DecodePlan(compiled_step=True, max_cache_len=64, skip=plan.skip,
                          proposer={"kind": "prompt_lookup", "draft": 3})
    proposer, why = DecodeEngine(model, drafting, compile=False).proposer(1, 8, 8)
    assert proposer is None and "skip" in why


def test_schedule_arithmetic():
    thresholds = ramp([5, 2, 9], warmup=64, every=16)
    assert thresholds == {5: 64, 2: 80, 9: 96}
    assert stage(thresholds, 79) == 1 and stage(thresholds, 96) == 3
    # 3 blocks of 30 skip 192 + 176 + 160 of 256 positions
    assert compute_fraction(thresholds, 30, 256) == pytest.approx(1 - (192 + 176 + 160) / (30 * 256))


def test_pass_applies_within_a_loose_budget_and_survives_save_and_load(tmp_path):
    model = tiny_llama(layers=6, seed=3)
    out = optpass.optimize(model, passes=[DynamicSkipConfig(max_skipped=3, warmup=16, every=8)],
                           quality_budget="kl:10")
    record = next(r for r in out.optpass_report.passes if r.name == "dynamic_skip")
    assert record.status == "applied", record.reason
    assert "skip 3 blocks" in [t["label"].split(" (")[0] for t in record.details["tried"]]  # the most aggressive
    assert len(scheduled(decoder_layers(out))) == 3 and 0 < record.details["compute_share"]["1024"] < 1
    optpass.save(out, tmp_path / "ckpt")
    back = optpass.load(tmp_path / "ckpt")
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(4))
    assert scheduled(decoder_layers(back)) == scheduled(decoder_layers(out))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, out(ids).logits)


def test_tight_budget_rolls_back_and_an_unmeasurable_schedule_is_refused():
    model = tiny_llama(layers=6, seed=3)
    out = optpass.optimize(model, passes=[DynamicSkipConfig(max_skipped=2, warmup=16, every=8)],
                           quality_budget="kl:1e-6")
    record = next(r for r in out.optpass_report.passes if r.name == "dynamic_skip")
    assert record.status != "applied" and "budget" in record.reason and not scheduled(decoder_layers(out))
    far = optpass.optimize(model, passes=[DynamicSkipConfig(warmup=500)], quality_budget="kl:10")
    record = next(r for r in far.optpass_report.passes if r.name == "dynamic_skip")
    assert record.status != "applied" and "cannot be measured" in record.reason
