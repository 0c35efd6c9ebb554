from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import optpass
from optpass import ConfigError, QualityBudget, UnknownPassError, UnknownTargetError, UnsupportedModelError


def test_unknown_target(tiny_llama):
    with pytest.raises(UnknownTargetError, match="'tpu9'.*known targets: cpu, cuda, a100"):
        optpass.optimize(tiny_llama, target="tpu9")


def test_unknown_pass_lists_registered(tiny_llama):
    with pytest.raises(UnknownPassError, match="'warp_drive'.*registered passes: .*dead_code"):
        optpass.optimize(tiny_llama, passes=["warp_drive"])


def test_non_module_input():
    with pytest.raises(UnsupportedModelError, match="needs a torch.nn.Module"):
        optpass.optimize(42)
    with pytest.raises(UnsupportedModelError, match="unknown model 'gpt-17': no such built-in name or path"):
        optpass.optimize("gpt-17")


@pytest.mark.parametrize("budget", [{"min_top1": 1.5}, {"max_ppl_increase": -0.01}, "psnr:-3", "speed:2x"])
def test_impossible_or_malformed_budget(tiny_llama, budget):
    with pytest.raises(ConfigError):
        optpass.optimize(tiny_llama, quality_budget=budget)


def test_bad_objective_and_duplicate_pass(tiny_llama):
    with pytest.raises(ConfigError, match="objective"):
        optpass.optimize(tiny_llama, objective="fun")
    with pytest.raises(ConfigError, match="twice"):
        optpass.optimize(tiny_llama, passes=["dead_code", "dead_code"])


def test_generic_module_without_inputs_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="example_inputs"):
        optpass.optimize(nn.Sequential(nn.Linear(4, 4)))


def test_nothing_to_optimize_is_reported(tiny_llama):
    out = optpass.optimize(tiny_llama, passes=["dead_code"])
    report = out.optpass_report
    assert any("nothing to optimize" in n for n in report.notes)
    assert report.passes[0].status == "skipped"
    assert out is not tiny_llama


def test_report_is_json_and_readable(tiny_dit):
    out = optpass.optimize(tiny_dit, passes=["dead_code"])
    report = out.optpass_report
    data = json.loads(json.dumps(report.to_dict()))
    assert data["target"] == "cpu" and data["capture"]["blocks"] == 2
    assert data["passes"][0]["status"] == "applied"
    assert {"baseline_ms", "optimized_ms", "predicted_baseline_ms"} <= set(data["latency"])
    text = str(report)
    assert "dead_code" in text and "chosen" in text and "latency" in text
    # the eval-mode dropouts are gone and outputs are bit-identical
    assert not any(isinstance(m, nn.Dropout) for m in out.modules())
    from optpass.models import tiny_dit_inputs

    batch = tiny_dit_inputs(tiny_dit)
    assert torch.equal(out(**batch).sample, tiny_dit(**batch).sample)


def test_config_round_trip_and_validation():
    from optpass.passes.dead_code import DeadCodeConfig

    cfg = DeadCodeConfig(dropout=False)
    assert DeadCodeConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="newer"):
        DeadCodeConfig.from_dict({"version": 99})
    with pytest.raises(ConfigError, match="unknown fields"):
        DeadCodeConfig.from_dict({"bogus": 1})


def test_budget_parse():
    b = QualityBudget.parse("ppl:2%, kl:0.05, top1:0.9")
    assert (b.max_ppl_increase, b.max_kl, b.min_top1) == (0.02, 0.05, 0.9)
    assert b.violations({"ppl_increase": 0.03, "kl": 0.01, "top1": 0.95}) == ["perplexity increase +3.00% > 2.00%"]


@pytest.mark.slow
def test_smollm2_exact_pass_keeps_generate(smollm2):
    model, tok = smollm2
    out = optpass.optimize(model, target="cpu", passes=["dead_code"])
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    want = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(out.generate(ids, max_new_tokens=12, do_sample=False), want)
    report = out.optpass_report
    assert report.capture["blocks"] == 30 and report.quality_reference["perplexity"] > 1
    assert any("pydoc_data" in note for note in report.notes)


@pytest.mark.slow
def test_smollm2_auto_optimize_is_quick_and_within_budget(smollm2):
    import time

    model, _ = smollm2
    start = time.perf_counter()
    out = optpass.optimize(model, target="cpu")  # auto: capture, candidates, guarded apply, measurement
    elapsed = time.perf_counter() - start
    assert elapsed < 120, f"optimize took {elapsed:.0f}s"
    record = next(r for r in out.optpass_report.passes if r.name == "quantize")
    assert record.status == "applied", record.reason
    assert 0 <= record.quality["ppl_increase"] <= 0.02
    assert out.optpass_report.memory["optimized_bytes"] < out.optpass_report.memory["baseline_bytes"]
