from __future__ import annotations

import pytest
import torch

import optpass
from optpass import PassOrderError, register_pass
from optpass.registry import unregister_pass
from tests.passes_for_tests import NoiseConfig, NoisePass, ordering_pass


@pytest.fixture
def noise_pass():
    register_pass(NoisePass)
    yield NoisePass
    unregister_pass(NoisePass.name)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_broken_pass_is_rolled_back(tiny_llama, noise_pass):
    before = _weights(tiny_llama)
    out = optpass.optimize(tiny_llama, passes=[NoiseConfig(make_nan=True)])
    record = out.optpass_report.passes[0]
    assert record.status == "rolled_back"
    assert "NaN" in record.reason
    ids = torch.randint(0, 256, (1, 8))
    torch.testing.assert_close(out(input_ids=ids).logits, tiny_llama(input_ids=ids).logits)
    assert all(torch.equal(v, tiny_llama.state_dict()[k]) for k, v in before.items())


def test_over_budget_pass_is_rolled_back(tiny_llama, noise_pass):
    out = optpass.optimize(tiny_llama, passes=[NoiseConfig(scale=0.5)], quality_budget="kl:0.001")
    record = out.optpass_report.passes[0]
    assert record.status == "rolled_back"
    assert "over quality budget" in record.reason and "KL" in record.reason
    assert record.quality["kl"] > 0.001


def test_within_budget_pass_is_kept(tiny_llama, noise_pass):
    out = optpass.optimize(tiny_llama, passes=[NoiseConfig(scale=0.001)], quality_budget="kl:0.01")
    record = out.optpass_report.passes[0]
    assert record.status == "applied", record.reason
    assert 0 < record.quality["kl"] < 0.01
    assert not torch.equal(out.model.layers[0].mlp.up_proj.weight, tiny_llama.model.layers[0].mlp.up_proj.weight)


def test_crashing_pass_is_reported_not_raised(tiny_llama, noise_pass):
    out = optpass.optimize(tiny_llama, passes=[NoiseConfig(crash=True)])
    record = out.optpass_report.passes[0]
    assert record.status == "failed" and "deliberate crash" in record.reason


def test_inplace_modifies_caller_model(tiny_llama, noise_pass):
    original = tiny_llama.model.layers[0].mlp.up_proj.weight.clone()
    out = optpass.optimize(tiny_llama, passes=[NoiseConfig(scale=0.001)], quality_budget="kl:0.01", inplace=True)
    assert out is tiny_llama
    assert not torch.equal(tiny_llama.model.layers[0].mlp.up_proj.weight, original)
    assert tiny_llama.optpass_report.applied == ["test_noise"]


@pytest.fixture
def ordered():
    made = []

    def make(*args, **kwargs):
        cls = ordering_pass(*args, **kwargs)
        register_pass(cls)
        made.append(cls.name)
        return cls

    yield make
    for name in made:
        unregister_pass(name)


def test_passes_run_in_constraint_order(tiny_llama, ordered):
    ordered("p_late", runs_after=("p_early",))
    ordered("p_early")
    ordered("p_needs", requires=("p_late",))
    out = optpass.optimize(tiny_llama, passes=["p_needs", "p_late", "p_early"], quality_budget="kl:1")
    assert out.optpass_order == ["p_early", "p_late", "p_needs"]


def test_cycle_is_an_error(tiny_llama, ordered):
    ordered("c_a", runs_after=("c_b",))
    ordered("c_b", runs_after=("c_a",))
    with pytest.raises(PassOrderError, match="cycle"):
        optpass.optimize(tiny_llama, passes=["c_a", "c_b"])


def test_missing_requirement_and_conflict(tiny_llama, ordered):
    ordered("r_a", requires=("r_missing",))
    with pytest.raises(PassOrderError, match="requires 'r_missing'"):
        optpass.optimize(tiny_llama, passes=["r_a"])
    ordered("x_a", conflicts=("x_b",))
    ordered("x_b")
    with pytest.raises(PassOrderError, match="conflict"):
        optpass.optimize(tiny_llama, passes=["x_a", "x_b"])
