"""The model matrix: every built-in pass through `optimize()` on a tiny random-weight version of each architecture
users run. Each row asserts the outputs against the unoptimized model, and for every pass either an applied
rewrite with its measured quality within the budget, or a named reason; nothing is applied by accident."""

from __future__ import annotations

import pytest
import torch

import optpass
from optpass.adapters import adapter_for
from optpass.metrics import logits_kl, rel_l2
from optpass.registry import registered_passes
from tests.model_zoo import MODELS, output

BUDGETS = {"causal_lm": "kl:0.05", "encoder": "cosine:0.95", "classifier": "kl:0.05", "diffusion_transformer": "psnr:15",
           "generic": "rel_l2:0.2"}
# what must apply on each architecture (the matrix fails if support silently regresses)
EXPECTED = {"llama": {"quantize", "kv_cache"}, "qwen2": {"quantize", "kv_cache"}, "qwen3": {"quantize", "kv_cache"},
            "gemma2": {"quantize", "kv_cache"}, "gemma3": {"quantize", "kv_cache"}, "gpt2": {"quantize", "kv_cache"},
            "mistral": {"quantize"}, "bert": {"quantize"}, "mlp": {"quantize"}, "dit": {"quantize"},
            "flux": {"quantize"}, "sd3": {"quantize"}}


def builtin_passes() -> list[str]:
    return sorted(n for n, cls in registered_passes().items() if cls.__module__.startswith("optpass.passes"))


def configured_passes() -> list:
    """Every built-in pass with its default config, except a shorter DiT-cache calibration (the default
    samples 50 steps x 10 seeds per candidate setting; its own tests cover the full search) and local layers
    with a window the tiny models' texts are longer than (the default 1024 hides nothing there)."""
    from optpass.passes.dit_cache import DitCacheConfig
    from optpass.passes.linear_attention import LinearAttentionConfig

    fast = {"dit_cache": DitCacheConfig(steps=12, calibration_seeds=(0,), holdout_seeds=(1,),
                                        policies=("fixed_interval",)),
            "linear_attention": LinearAttentionConfig(window=32, calibration_len=256)}
    return [fast.get(name, name) for name in builtin_passes()]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_pass_on_every_architecture(name):
    build, inputs, extra = MODELS[name]
    model = build()
    kwargs = inputs(model)
    kind = adapter_for(model).kind
    with torch.no_grad():
        reference = output(model, kwargs)
        optimized = optpass.optimize(model, passes=configured_passes(), quality_budget=BUDGETS[kind], **extra)
        got = output(optimized, kwargs)
        assert torch.equal(output(model, kwargs), reference), "the caller's model is untouched"
    records = {r.name: r for r in optimized.optpass_report.passes}
    assert set(records) == set(builtin_passes())
    budget = optimized.optpass_report.budget
    for record in records.values():
        if record.status == "applied":
            assert record.quality or record.details, f"{record.name} applied without a measured effect"
            if record.quality:
                assert record.quality.get("finite") == 1.0
        else:
            assert record.reason, f"{record.name} on {name}: {record.status} without a reason"
    applied = {n for n, r in records.items() if r.status == "applied"}
    assert EXPECTED[name] <= applied, {n: records[n].reason for n in EXPECTED[name] - applied}
    assert torch.isfinite(got).all()
    if applied <= {"kv_cache", "dead_code"}:  # neither changes a cache-free forward
        torch.testing.assert_close(got, reference)
    elif kind in ("causal_lm", "classifier"):  # re-measured here on other inputs than the guard's
        assert logits_kl(reference, got) < 3 * 0.05
    else:
        assert rel_l2(reference, got, kwargs.get("attention_mask")) < 0.3, budget
