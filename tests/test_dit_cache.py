"""DiT block caching: policy decisions, reuse exactness, generation reset, calibration on the trained digit DiT,
refusals, and the saved_state / restore round trip."""

from __future__ import annotations

import json

import pytest
import torch

from optpass.digit_dit import DigitDitRecipe, load_digit_dit
from optpass.passes.dit_cache import DitCacheConfig, DitCachePass, find_stack
from optpass.passes.dit_caching import (
    StepSignal,
    cache_controller,
    install_block_cache,
    make_policy,
    remove_block_cache,
)
from optpass.passes.dit_caching.forecast import TaylorForecaster
from optpass.sampling import ddim_sample, image_metrics
from tests.dit_models_for_tests import PlainDiT

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")


def _decisions(policy, signals):
    return "".join(policy.decide(s, have_cache=True)[0] for s in signals)


def test_fixed_interval_decisions():
    policy = make_policy("fixed_interval", threshold=3, warmup=1)
    assert _decisions(policy, [StepSignal(i, 0.0) for i in range(10)]) == "ccrrcrrcrr"


def test_first_block_decisions_and_skip_cap():
    policy = make_policy("first_block", threshold=0.1, warmup=1, max_skip=2)
    changes = [None, 0.05, 0.2, 0.01, 0.01, 0.01, 0.3, 0.0]
    assert _decisions(policy, [StepSignal(i, 0.0, probe_change=c) for i, c in enumerate(changes)]) == "crcrrcc" + "r"


def test_teacache_accumulates_until_threshold():
    policy = make_policy("teacache", threshold=0.25, warmup=1)
    changes = [None, 0.1, 0.1, 0.1, 0.05, 0.3, 0.1]
    # 0.1, 0.2 -> reuse; 0.3 -> compute (reset); 0.05 -> reuse; 0.35 -> compute; 0.1 -> reuse
    assert _decisions(policy, [StepSignal(i, 0.0, modulated_change=c) for i, c in enumerate(changes)]) == "crrcrcr"


def test_taylorseer_forecasts_and_gate():
    plain = make_policy("taylorseer", threshold=2, warmup=1, order=2)
    assert _decisions(plain, [StepSignal(i, 0.0) for i in range(6)]) == "ccfcfc"
    gated = make_policy("taylorseer_gated", threshold=0.05, warmup=1, max_skip=8)
    errors = [None, 0.01, 0.2, 0.04, None]
    assert _decisions(gated, [StepSignal(i, 0.0, forecast_error=e) for i, e in enumerate(errors)]) == "cfcfc"


def test_warmup_and_empty_cache_force_compute():
    policy = make_policy("first_block", threshold=10.0, warmup=3)
    assert "".join(policy.decide(StepSignal(i, 0.0, probe_change=0.0), True)[0] for i in range(5)) == "cccrr"
    assert policy.decide(StepSignal(9, 0.0, probe_change=0.0), have_cache=False) == "compute"


@pytest.mark.parametrize("order", [0, 1, 2])
def test_taylor_forecaster_is_exact_on_polynomials(order):
    f = TaylorForecaster(order)
    poly = lambda s: torch.tensor([3.0 + (0.5 * s if order >= 1 else 0) + (0.25 * s * s if order >= 2 else 0)])  # noqa: E731
    for s in (0, 2, 5):  # uneven spacing: Newton divided differences handle it
        f.update(s, poly(s))
    assert torch.allclose(f.predict(7), poly(7), atol=1e-5)
    assert len(f.values) == order + 1  # bounded memory


@pytest.fixture(scope="module")
def digit_dit():
    return load_digit_dit()


def _sample(model, seeds=(0, 1, 2), steps=20):
    return ddim_sample(model, list(seeds), [s % 10 for s in seeds], steps)


@pytest.mark.parametrize("name,threshold", [("first_block", 0.0), ("teacache", 0.0), ("fixed_interval", 1),
                                            ("taylorseer", 1), ("taylorseer_gated", 0.0)])
def test_threshold_zero_reproduces_uncached_exactly(digit_dit, name, threshold):
    ref = _sample(digit_dit)
    controller = install_block_cache(digit_dit, "transformer_blocks", make_policy(name, threshold=threshold))
    try:
        assert torch.equal(_sample(digit_dit), ref)
        assert controller.stats.computed_fraction == 1.0 and controller.stats.steps == 20
    finally:
        remove_block_cache(digit_dit)
    assert type(digit_dit.transformer_blocks) is torch.nn.ModuleList and not digit_dit._forward_pre_hooks


def test_skipping_changes_output_and_counts_blocks(digit_dit):
    ref = _sample(digit_dit)
    controller = install_block_cache(digit_dit, "transformer_blocks", make_policy("fixed_interval", threshold=3))
    try:
        out = _sample(digit_dit)
    finally:
        remove_block_cache(digit_dit)
    n = controller.num_blocks
    computed_steps = sum(d == "compute" for d in controller.stats.decisions)
    assert controller.stats.blocks_run == computed_steps * n + (20 - computed_steps) * controller.n_last
    assert not torch.equal(out, ref) and image_metrics(ref, out)["psnr"] > 15


def test_state_resets_between_generations(digit_dit):
    install_block_cache(digit_dit, "transformer_blocks", make_policy("taylorseer", threshold=3, order=2))
    try:
        first, second = _sample(digit_dit), _sample(digit_dit)
        controller = cache_controller(digit_dit)
        assert controller.step == 19 and controller.stats.steps == 40
        other = _sample(digit_dit, seeds=(5, 6, 7))  # a different batch in between
        assert torch.equal(first, second) and torch.equal(_sample(digit_dit), first) and not torch.equal(other[:1], first[:1])
    finally:
        remove_block_cache(digit_dit)


def test_single_forward_with_mixed_timesteps_is_untouched(digit_dit):
    """The quality guard calls one forward with per-sample timesteps: the cache must stay out of it."""
    x = torch.randn(2, 1, 16, 16)
    kwargs = {"timestep": torch.tensor([10, 900]), "class_labels": torch.tensor([1, 2]), "return_dict": False}
    with torch.no_grad():
        ref = digit_dit(x, **kwargs)[0]
        install_block_cache(digit_dit, "transformer_blocks", make_policy("fixed_interval", threshold=1e6))
        try:
            outs = [digit_dit(x, **kwargs)[0] for _ in range(3)]
        finally:
            remove_block_cache(digit_dit)
    assert all(torch.equal(o, ref) for o in outs)


def test_plain_pytorch_dit(tmp_path):
    model = PlainDiT(depth=4).eval()
    ref = ddim_sample(model, [0, 1], [3, 4], steps=12)
    controller = install_block_cache(model, "blocks", make_policy("first_block", threshold=0.0, warmup=1), n_first=1)
    assert torch.equal(ddim_sample(model, [0, 1], [3, 4], steps=12), ref) and controller.stats.steps == 12
    from optpass.passes.dit_caching import block_cache

    with block_cache(model, "blocks", make_policy("fixed_interval", threshold=2)) as ctl:
        out = ddim_sample(model, [0, 1], [3, 4], steps=12)
    assert ctl.stats.computed_fraction < 1.0 and not torch.equal(out, ref)
    assert type(model.blocks) is torch.nn.ModuleList and torch.equal(ddim_sample(model, [0, 1], [3, 4], steps=12), ref)


def _run_pass(model, config, budget="psnr:30"):
    from optpass.api import optimize

    return optimize(model, passes=[DitCachePass(config)], quality_budget=budget)


def test_calibration_meets_budget_on_heldout_seeds(digit_dit):
    cfg = DitCacheConfig(steps=20, policies=("first_block", "teacache", "taylorseer"), calibration_seeds=(0, 1, 2),
                         holdout_seeds=(1000, 1001, 1002, 1003))
    optimized = _run_pass(digit_dit, cfg)
    record = next(p for p in optimized.optpass_report.passes if p.name == "dit_cache")
    assert record.status == "applied", record.reason
    details = record.details
    assert details["holdout_psnr"] >= 30 and details["calibration_psnr"] >= 31  # calibration keeps a 1 dB margin
    assert details["computed_fraction"] < 0.5 and details["calibration"]["trials"]
    # independent check on seeds neither calibration nor the hold-out used
    seeds = [50, 51, 52]
    ref = ddim_sample(digit_dit, seeds, [s % 10 for s in seeds], 20)
    out = ddim_sample(optimized, seeds, [s % 10 for s in seeds], 20)
    assert image_metrics(ref, out)["psnr"] >= 28.0  # budget 30 dB on hold-out; fresh seeds within 2 dB of it
    assert cache_controller(optimized).stats.computed_fraction < 0.5
    # saved_state / restore: a fresh model rebuilt from the record samples identically, no recalibration
    p = DitCachePass(cfg)
    state = json.loads(json.dumps(p.saved_state(optimized)))
    assert state["policy"] == details["policy"]
    fresh = p.restore(load_digit_dit(), state)
    assert torch.equal(ddim_sample(fresh, seeds, [s % 10 for s in seeds], 20), out)


def test_second_differently_sized_dit_calibrates_without_tuning():
    model = load_digit_dit(DigitDitRecipe(layers=4, heads=2, head_dim=16, steps=400, lr=3e-3, seed=1))
    assert find_stack(_graph(model)) == ("transformer_blocks", 4)
    p = DitCachePass(DitCacheConfig(steps=25, policies=("first_block", "teacache", "taylorseer"),
                                    calibration_seeds=(0, 1), holdout_seeds=(7, 8, 9)))
    from optpass.pass_base import ApplyContext
    from optpass.cost_models import get_spec

    result = p.apply(model, p.candidates(_graph(model), get_spec("cpu")), ApplyContext(target=get_spec("cpu")))
    assert result.modified, result.reason
    assert result.details["holdout_psnr"] >= 30 and result.details["computed_fraction"] < 0.8


def _graph(model):
    from optpass.adapters import adapter_for
    from optpass.capture import capture

    return capture(model, None, adapter_for(model).example_batch(model).kwargs)


def test_four_step_schedule_is_refused(digit_dit):
    from optpass.cost_models import get_spec

    p = DitCachePass(DitCacheConfig(steps=4))
    cands = p.candidates(_graph(digit_dit), get_spec("cpu"))
    assert len(cands) == 1 and not cands[0].viable and "4-step" in cands[0].reason and "distilled" in cands[0].reason


def test_impossible_budget_is_refused(digit_dit):
    from optpass.cost_models import get_spec
    from optpass.pass_base import ApplyContext

    p = DitCachePass(DitCacheConfig(steps=12, min_psnr=200.0, policies=("fixed_interval", "first_block"),
                                    calibration_seeds=(0,), holdout_seeds=(1,)))
    result = p.apply(digit_dit, p.candidates(_graph(digit_dit), get_spec("cpu")), ApplyContext(target=get_spec("cpu")))
    assert not result.modified and "no policy / threshold meets the budget" in result.reason
    assert type(digit_dit.transformer_blocks) is torch.nn.ModuleList  # nothing left installed


def test_structure_that_leaves_nothing_to_cache_is_rejected():
    from optpass.errors import UnsupportedModelError

    model = PlainDiT(depth=3)
    with pytest.raises(UnsupportedModelError, match="no block to cache"):
        install_block_cache(model, "blocks", make_policy("first_block", threshold=0.1), n_first=2, n_last=1)
    assert type(model.blocks) is torch.nn.ModuleList


def test_config_validation():
    from optpass.errors import ConfigError

    with pytest.raises(ConfigError, match="policies"):
        DitCacheConfig(policies=("nope",))
    with pytest.raises(ConfigError, match="disjoint"):
        DitCacheConfig(calibration_seeds=(1, 2), holdout_seeds=(2,))
    assert DitCacheConfig.from_dict(json.loads(json.dumps(DitCacheConfig().to_dict()))) == DitCacheConfig()
