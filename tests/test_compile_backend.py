"""torch.compile(backend="optpass"): graph quantization of linear calls, then Inductor; compose with optimize()."""

from __future__ import annotations

import copy
from importlib.metadata import entry_points

import pytest
import torch
import torch._dynamo
from torch import nn

import optpass
from optpass import compile_backend as cb
from optpass.backends.cpu.quant_linear import Int8Linear, QuantizedLinear
from optpass.compile_backend import OptpassBackend
from optpass.passes.quantize import QuantizeConfig
from optpass.quality import rel_l2, top1_agreement


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _int8_eager(model: nn.Module, keep: tuple[str, ...] = ("lm_head",)) -> nn.Module:
    """The module-path equivalent of the backend's default rewrite: every float linear but `keep` -> Int8Linear."""
    ref = copy.deepcopy(model)
    for path, module in list(ref.named_modules()):
        if isinstance(module, nn.Linear) and path not in keep:
            parent, _, attr = path.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, attr, Int8Linear.from_linear(module))
    return ref


def test_backend_is_discoverable_by_name():
    assert "optpass" in torch._dynamo.list_backends()
    eps = [ep for ep in entry_points(group="torch_dynamo_backends") if ep.name == "optpass"]
    assert eps and eps[0].load() is cb.optpass_backend


def test_tiny_llama_quantized_matches_eager_and_does_not_recompile(tiny_llama):
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    backend = OptpassBackend(target="cpu", passes=["quantize"])
    compiled = torch.compile(tiny_llama, backend=backend)
    with torch.no_grad():
        out = compiled(input_ids=ids, use_cache=False).logits
        again = compiled(input_ids=ids, use_cache=False).logits
        ref = _int8_eager(tiny_llama)(input_ids=ids, use_cache=False).logits
        fp = tiny_llama(input_ids=ids, use_cache=False).logits
    assert backend.compiles == 1  # the second call reused the compiled graph
    report = backend.reports[0]
    quant = next(p for p in report.passes if p["name"] == "quantize")
    assert quant["status"] == "applied" and len(quant["sites"]) == 14  # 2 layers x 7 linears; lm_head kept float
    assert "lm_head" not in quant["sites"]
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=0)  # same int8 weights, bf16 kernel rounding
    torch.testing.assert_close(again, out)
    assert 0 < rel_l2(fp, out) < 0.05  # quantized (not a no-op), close to float


def test_options_by_name_and_unknown_option(tiny_llama):
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    before = len(cb.REPORTS)
    compiled = torch.compile(tiny_llama, backend="optpass",
                             options={"target": "cpu", "passes": ["quantize"], "quantize": {"lm_head": "int8"},
                                      "inductor": False})
    with torch.no_grad():
        compiled(input_ids=ids, use_cache=False)
    assert len(cb.REPORTS) == before + 1
    assert "lm_head" in next(p for p in cb.last_report().passes if p["name"] == "quantize")["sites"]
    torch._dynamo.reset()
    bad = torch.compile(tiny_llama, backend="optpass", options={"tgt": "cpu"})
    with pytest.raises(Exception, match="unknown options"):
        bad(input_ids=ids, use_cache=False)


def test_optimized_model_is_not_quantized_twice(tiny_llama):
    optimized = optpass.optimize(tiny_llama, passes=[QuantizeConfig(weights="int8", lm_head="int8", fast_decode=False)])
    assert all(isinstance(m, QuantizedLinear) for n, m in optimized.named_modules() if n.endswith("proj"))
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    backend = OptpassBackend(target="cpu", passes=["quantize"], inductor=False)  # the rewrite decision is under test
    with torch.no_grad():
        out = torch.compile(optimized, backend=backend)(input_ids=ids, use_cache=False).logits
        ref = optimized(input_ids=ids, use_cache=False).logits
    report = backend.reports[0]
    assert report.linear_calls == 0 and report.already_quantized == 15
    assert next(p for p in report.passes if p["name"] == "quantize")["status"] == "skipped"
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=0)


def test_tiny_dit_matches_eager(tiny_dit):
    from optpass.models import tiny_dit_inputs

    inputs = tiny_dit_inputs(tiny_dit)
    backend = OptpassBackend(target="cpu", passes=["quantize"], quantize={"lm_head": "int8"})
    with torch.no_grad():
        out = torch.compile(tiny_dit, backend=backend)(**inputs, return_dict=False)[0]
        ref = tiny_dit(**inputs, return_dict=False)[0]
    applied = sum(len(p["sites"]) for r in backend.reports for p in r.passes if p["name"] == "quantize")
    assert applied >= 8  # attention q/k/v/out and MLP linears of both blocks
    assert 0 < rel_l2(ref, out) < 0.02


@pytest.mark.slow
def test_smollm2_compiles_and_matches_eager(smollm2):
    model, tokenizer = smollm2
    from optpass.corpus import token_windows

    ids = token_windows(tokenizer, window=32, count=1, offset_windows=3)
    backend = OptpassBackend(target="cpu", passes=["quantize"])
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        out = compiled(input_ids=ids, use_cache=False).logits
        compiled(input_ids=ids, use_cache=False)
        ref = model(input_ids=ids, use_cache=False).logits
    assert backend.compiles == 1
    assert len(backend.reports[0].passes[0]["sites"]) == 210  # 30 layers x 7; the head stays float
    assert top1_agreement(ref, out) >= 0.9
    assert rel_l2(ref, out) < 0.1


_SECOND_PROCESS = """
import torch
from torch._dynamo.utils import counters
from optpass.models import tiny_llama
compiled = torch.compile(tiny_llama(layers=2), backend="optpass")
with torch.no_grad():
    compiled(torch.zeros(1, 8, dtype=torch.long))
print("fxgraph", counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
"""


def test_a_second_process_reuses_the_compiled_artifacts_without_tracebacks(tmp_path):
    """The quantized modules pickle into Inductor's cache key (no local lambdas), so a second process hits the
    FX graph cache instead of recompiling, and neither prints a traceback."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "OPTPASS_PROGRESS": "0"}
    runs = [subprocess.run([sys.executable, "-c", _SECOND_PROCESS], env=env, capture_output=True, text=True,
                           timeout=600) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
        assert "Traceback" not in run.stderr and "pickle" not in run.stderr.lower(), run.stderr[-2000:]
    first, second = ([int(v) for v in r.stdout.split("fxgraph")[1].split()] for r in runs)
    assert first == [0, 1] and second[0] >= 1 and second[1] == 0  # (hits, misses): compiled once, then reused
