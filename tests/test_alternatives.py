"""The one place alternatives are tried under the budget (`cost_models.selection.choose_within_budget`): options in
order, the first within budget kept, every rejected one undone, each outcome recorded with its quality."""

from __future__ import annotations

import torch
from torch import nn

import optpass
from optpass.cost_models.selection import choose_within_budget
from optpass.models import tiny_llama
from optpass.pass_base import Alternatives, Option
from optpass.passes.quantize import QuantizeConfig


class ScaleGuard:
    """A guard whose only metric is the model's weight scale: within budget while scale <= limit."""

    def __init__(self, limit: float) -> None:
        self.limit = limit

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"scale": float(model.weight.abs().max())}

    def check(self, metrics: dict[str, float]) -> list[str]:
        return [f"scale {metrics['scale']:g} > {self.limit:g}"] if metrics["scale"] > self.limit else []


def _scaler(factor: float) -> Option:
    def apply(model: nn.Module):
        with torch.no_grad():
            model.weight.mul_(factor)

        def undo() -> None:
            with torch.no_grad():
                model.weight.div_(factor)
        return undo
    return Option(f"x{factor:g}", apply, value=factor)


def test_first_option_within_budget_is_kept_and_rejected_ones_are_undone():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    decision = Alternatives("scale", [_scaler(8.0), _scaler(4.0), _scaler(2.0), _scaler(1.5)])
    kept, outcomes = choose_within_budget(model, [decision], ScaleGuard(limit=3.0))
    assert kept["scale"].value == 2.0
    assert float(model.weight.max()) == 2.0  # 8x and 4x were undone, 2x stays, 1.5x never tried
    assert [o.label for o in outcomes["scale"]] == ["x8", "x4", "x2"]
    assert outcomes["scale"][0].why.startswith("over budget: scale 8") and outcomes["scale"][2].why == "within budget"
    assert outcomes["scale"][1].quality == {"scale": 4.0}


def test_nothing_within_budget_keeps_none_and_leaves_the_model_as_it_was():
    model = nn.Linear(2, 2, bias=False)
    before = model.weight.detach().clone()
    kept, outcomes = choose_within_budget(model, [Alternatives("scale", [_scaler(8.0), _scaler(4.0)])],
                                          ScaleGuard(limit=1e-6))
    assert kept["scale"] is None and len(outcomes["scale"]) == 2
    torch.testing.assert_close(model.weight, before)


def test_own_measure_is_used_and_a_lone_option_without_one_is_kept_unmeasured():
    model = nn.Linear(2, 2, bias=False)
    measured = Option("own", lambda m: (lambda: None), measure=lambda m: {"scale": 100.0})
    lone = Option("lone", lambda m: (lambda: None))
    kept, outcomes = choose_within_budget(model, [Alternatives("a", [measured]), Alternatives("b", [lone])],
                                          ScaleGuard(limit=3.0))
    assert kept["a"] is None and outcomes["a"][0].quality == {"scale": 100.0}
    assert kept["b"] is lone and outcomes["b"][0].why == "kept (no alternative to compare)"


def test_quantize_reports_every_scheme_it_tried_per_decision():
    """Through optimize(): the head's int4 option is tried first (fastest) and rejected under a tight budget,
    int8 kept; the report records both outcomes with their measured KL."""
    out = optpass.optimize(tiny_llama(), passes=[QuantizeConfig(weights="int8", lm_head="auto", fast_decode=False)],
                           quality_budget="kl:1e-5")
    record = out.optpass_report.passes[0]
    tried = record.details["lm_head"]["tried"]
    assert len(tried) >= 2 and all("quality" in t for t in tried)
    kept = record.details["lm_head"]["kept"]
    for t in tried:
        assert (t["why"] == "within budget") == (t["label"] == kept)


def test_monotone_decision_is_bisected_to_the_most_aggressive_option_within_budget():
    """Seven options from x7 down to x1 with a limit of 4.5: x4 is kept (left applied), in at most 4 measurements
    (mildest first, then a binary search) instead of 4 tried in order; a limit nothing meets costs one."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    options = [_scaler(float(f)) for f in range(7, 0, -1)]
    kept, outcomes = choose_within_budget(model, [Alternatives("scale", options, monotone=True)], ScaleGuard(4.5))
    assert kept["scale"].value == 4.0 and float(model.weight) == 4.0
    assert len(outcomes["scale"]) <= 4 and outcomes["scale"][0].label == "x1"
    with torch.no_grad():
        model.weight.fill_(1.0)
    kept, outcomes = choose_within_budget(model, [Alternatives("scale", options, monotone=True)], ScaleGuard(0.5))
    assert kept["scale"] is None and len(outcomes["scale"]) == 1 and float(model.weight) == 1.0
