"""Cost model: datasheet specs (dense figures), sympy formulas against torch's FLOP counter, symbolic crossovers,
the calibration cache and its fingerprint, selection under the error band, and `explain`."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import sympy as sp
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from optpass.cost_models import calibrate as cal
from optpass.cost_models import formulas as F
from optpass.cost_models import get_spec
from optpass.cost_models.estimate import RewriteEstimate
from optpass.cost_models.model_cost import forward_expr, overrides_for, predict_forward
from optpass.cost_models.selection import select
from optpass.errors import CalibrationError
from optpass.pass_base import Candidate


@pytest.fixture(scope="module")
def tiny_graph():
    from optpass.capture import capture
    from optpass.models import tiny_llama

    model = tiny_llama()
    return model, capture(model)


@pytest.fixture
def quick_calibration(tmp_path, monkeypatch):
    """A seconds-long calibration cached under a temporary OPTPASS_CACHE."""
    monkeypatch.setenv("OPTPASS_CACHE", str(tmp_path))
    cal._LOADED.clear()
    try:
        record = cal.calibrate(quick=True, progress=False, backoff=(2.0, 5.0))
    except CalibrationError as exc:  # the refusal is the feature (tests/test_calibration_checks.py)
        pytest.skip(f"no trustworthy calibration on this machine right now: {exc}")
    cal.save(record)
    yield record
    cal._LOADED.clear()


# Dense datasheet figures (vendor sheets also quote 2:4-sparse peaks, twice these): (bf16 FLOP/s, bytes/s)
DENSE = {"h100": (989e12, 3.35e12), "h200": (989e12, 4.8e12), "a100": (312e12, 2.039e12),
         "l4": (121e12, 300e9), "rtx4090": (165e12, 1008e9)}


@pytest.mark.parametrize("name", sorted(DENSE))
def test_gpu_specs_store_dense_figures(name):
    spec = get_spec(name)
    bf16, bw = DENSE[name]
    assert spec.peak_flops["bf16"] == pytest.approx(bf16, rel=0.01)  # a sparse figure would be 2x
    assert spec.mem_bandwidth == pytest.approx(bw, rel=0.01)
    assert {"peak_flops", "mem_bandwidth", "mem_capacity", "launch_floor"} <= set(spec.source)
    assert not spec.calibrated and spec.error_band >= 0.2  # datasheet specs are ordering-only


def test_other_spec_figures():
    assert get_spec("m2").mem_bandwidth == pytest.approx(100e9)
    assert get_spec("h200").peak_flops == get_spec("h100").peak_flops
    assert get_spec("a100").peak_flops["int4"] == pytest.approx(2 * get_spec("a100").peak_flops["int8"])
    assert "int4" not in get_spec("h100").peak_flops  # Hopper has no int4 tensor-core path
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_spec("h100").mem_bandwidth = 1.0


def test_linear_flops_match_torch_flop_counter(tiny_graph):
    model, graph = tiny_graph
    batch, seq = 2, 16
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.zeros(batch, seq, dtype=torch.long), use_cache=False)
    counted = sum(counter.get_flop_counts()["Global"].values())
    ours = sum(F.matmul_flops(s.out_features, s.in_features, F.B * F.S) for s in graph.linears)
    assert counted > 0 and int(ours.subs({F.B: batch, F.S: seq})) == counted


def test_attention_flops_match_torch_sdpa_formula():
    b, h, s, ctx, d = 2, 4, 24, 40, 16
    reference = sdpa_flop_count((b, h, s, d), (b, h, ctx, d), (b, h, ctx, d))
    assert int(F.attention_flops(b, h, sp.Integer(s), sp.Integer(ctx), d, causal=False)) == reference
    causal = F.attention_flops(1, h, F.S, F.S, d, causal=True)
    assert int(causal.subs(F.S, 64)) == 4 * h * d * 64 * 65 // 2  # causal: about half the pairs


def test_kv_read_and_attention_variant_formulas():
    spec = get_spec("h100")
    assert F.kv_read_bytes(30, 3, 64, 2, keep_ratio=0.5).subs({F.B: 1, F.S_ctx: 1000}) == 2 * 30 * 3 * 0.5 * 1000 * 64 * 2
    dense = F.sdpa_time(spec, 32, 8, 128, ctx=F.S)
    sparse = F.sparse_attention_time(spec, 32, 8, 128, rho=0.1, ctx=F.S)
    at = {F.B: 1, F.S: 32768}
    assert float(sparse.subs(at)) < 0.2 * float(dense.subs(at))
    lin = F.linear_attention_time(spec, 32, 128)
    assert float(lin.subs({F.B: 1, F.S: 2 ** 20})) == pytest.approx(2 * float(lin.subs({F.B: 1, F.S: 2 ** 19})), rel=1e-6)


def test_symbolic_crossover_on_toy_cases():
    # smooth: before = 2 + S/2, after = 10 + S/4 -> the rewrite pays above S = 32, solved exactly
    assert F.crossover((10 + F.S / 4) - (2 + F.S / 2)) == pytest.approx(32.0)
    # piecewise (a roofline): after = Max(100, S), before = 2 S -> pays above S = 50, found by bisection
    assert F.crossover(sp.Max(100, F.S) - 2 * F.S) == pytest.approx(50.0, abs=1e-6)
    assert F.crossover(sp.Max(100, F.S) - 1000) == pytest.approx(1000.0, abs=1e-6)
    assert F.crossover(sp.Max(100, F.S) + 5) is None  # never changes sign below 65536
    assert F.crossover(sp.Integer(0) * F.S) is None  # no difference: no crossover


def test_calibration_cache_and_fingerprint(quick_calibration, monkeypatch):
    spec = get_spec("cpu")
    assert spec.calibrated and "calibrated (quick)" in spec.source["calibration"]
    rec = quick_calibration
    assert rec["triad"]["bytes_per_s"] > 0 and set(rec["linear"]) == {"fp32", "int8", "int4_g32"}
    for scheme in rec["linear"].values():
        assert all(r > 0 for r in scheme["rates"].values()) and scheme["bw"] > 0
    # the spec uses the measured figures, not the estimates
    assert spec.mem_bandwidth == rec["triad"]["bytes_per_s"] and spec.linear["int8"]["overhead"] == rec["linear"]["int8"]["overhead"]
    # another torch version / thread count / ISA => another key; a stale record at this key is rejected too
    other = {**cal.fingerprint(), "threads": cal.fingerprint()["threads"] + 1}
    assert cal.cache_path(other) != cal.cache_path()
    path = cal.cache_path()
    data = json.loads(path.read_text())
    data["fingerprint"]["torch"] = "0.0.0"
    path.write_text(json.dumps(data))
    assert cal.load() is None
    stale = get_spec("cpu")
    assert not stale.calibrated and "uncalibrated" in stale.source["calibration"]


def test_calibrated_linear_formula_reproduces_its_measurement(quick_calibration):
    spec = get_spec("cpu")
    n, k = quick_calibration["shape"]
    for scheme, v in spec.linear.items():
        for rows, rate in v["rates"].items():
            t = F.evaluate(F.linear_time(spec, scheme, n, k, sp.Integer(rows)))
            net = 2.0 * rows * n * k / rate
            assert t >= v["overhead"] + net * (1 - 1e-9)  # never faster than measured (memory term may bind)
        # between two measured row counts the kernel time is interpolated linearly in M
        at = {m: 2.0 * m * n * k / r for m, r in v["rates"].items()}
        mid = float(F._compute_seconds(v["rates"], n, k, sp.Float(8.5)))
        assert mid == pytest.approx((at[1] + at[16]) / 2)


def _cand(label: str, before: float, after: float) -> Candidate:
    return Candidate("quantize", (label,), {"group": label}, RewriteEstimate(before, after, 0.0), label=label)


def test_auto_never_selects_a_predicted_slowdown_or_a_gain_inside_the_band():
    cands = [_cand("slower", 1.0, 1.2), _cand("wash", 1.0, 0.97), _cand("faster", 1.0, 0.5)]
    decisions = {d.candidate.label: d for d in select(cands, auto=True, error_band=0.1, band_note="calibrated error band")}
    assert [k for k, d in decisions.items() if d.chosen] == ["faster"]
    assert "does not beat the calibrated error band (10%)" in decisions["wash"].reason
    explicit = {d.candidate.label: d for d in select(cands, auto=False)}
    assert explicit["slower"].chosen and "predicted loss" in explicit["slower"].reason


def test_quantize_candidates_use_formulas_and_auto_skips_predicted_slowdowns(tiny_graph, quick_calibration):
    from optpass.passes.quantize import QuantizePass

    _, graph = tiny_graph
    spec = get_spec("cpu")
    # make the int4 kernel absurdly slow: its candidate must now predict a slowdown and never be chosen
    slow = dataclasses.replace(spec, linear={**spec.linear, "int4_g32": {**spec.linear["int4_g32"], "overhead": 1.0}})
    cands = [c for c in QuantizePass().candidates(graph, slow) if c.viable]
    by_label = {c.label: c for c in cands}
    assert by_label["blocks int4 g32"].estimate.d_latency > 0
    expect = predict_forward(graph, slow, *graph.estimate_shape, overrides=overrides_for([by_label["blocks int8"]]))
    assert by_label["blocks int8"].estimate.after == pytest.approx(expect)
    for d in select(cands, auto=True, error_band=slow.error_band):
        assert not d.chosen or d.candidate.estimate.d_latency < 0


def test_forward_expr_is_symbolic_and_monotone_in_sequence(tiny_graph):
    _, graph = tiny_graph
    spec = get_spec("h100")
    expr = forward_expr(graph, spec)
    assert {F.B, F.S, F.S_ctx} >= expr.free_symbols and F.S in expr.free_symbols
    times = [predict_forward(graph, get_spec("a100"), 1, s, s) for s in (1, 64, 4096, 16384)]
    assert times == sorted(times) and times[-1] > times[0]


def test_explain_tiny_model_prints_costs_candidates_and_plots(tiny_graph, tmp_path):
    import optpass

    model, _ = tiny_graph
    out = optpass.explain(model, target="h100")
    text = str(out)
    assert "where the time goes" in text and "quantize: blocks int8" in text
    assert math.isclose(sum(c["share"] for c in out.costs), 1.0, rel_tol=1e-6)
    assert all(c["gain"] is None or c["chosen"] is False or c["gain"] > out.error_band for c in out.candidates)
    png = out.plot(str(tmp_path / "curve.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_calibrate_rejects_gpu_targets(capsys):
    from optpass.cli import main

    assert main(["calibrate", "--target", "h100"]) == 2  # a usage error (UnknownTargetError is a ValueError)
    assert "only 'cpu' is calibrated" in capsys.readouterr().err


@pytest.mark.slow
def test_explain_smollm2_cpu_and_h100_plans_differ(smollm2, smollm2_graph):
    import optpass

    plans = {t: optpass.explain(smollm2[0], target=t, graph=smollm2_graph) for t in ("cpu", "h100")}
    assert plans["cpu"].plan != plans["h100"].plan
    for out in plans.values():
        assert all(c["reason"] for c in out.candidates)


def test_vocabulary_sized_weights_use_their_own_measured_regime():
    """A full calibration also measures a vocabulary-sized layer; weights nearer that size are priced with its
    rates (the block-sized layer's FLOP/s does not transfer to a 49152 x 576 head), smaller ones are not."""
    import dataclasses

    small = {"rates": {1: 1e9, 16: 1e10}, "bw": 2e10, "numel": 1_000_000}
    large = {"rates": {1: 1e9, 16: 2.5e9}, "bw": 1e10, "numel": 25_000_000}
    spec = dataclasses.replace(get_spec("cpu"), linear={"fp32": {"overhead": 0.0, **small, "large": large}})
    def seconds(n: int, k: int) -> float:
        return F.evaluate(F.linear_time(spec, "fp32", n, k, sp.Integer(16)))
    assert seconds(1000, 1000) == pytest.approx(2 * 16 * 1e6 / 1e10)  # block-sized: compute-bound at 1e10
    assert seconds(5000, 5000) == pytest.approx(2 * 16 * 25e6 / 2.5e9)  # vocabulary-sized: its own 2.5e9


def test_explain_curves_show_each_candidate_even_when_the_plan_changes_no_forward(tiny_graph):
    """The plot's curves: the baseline, each linear-scheme candidate alone, and the plan only when it changes
    the forward (never a second copy of the baseline labelled 'plan: nothing')."""
    import optpass

    model, _ = tiny_graph
    out = optpass.explain(model, target="cpu", passes=["quantize"])
    for mode, series in out.curves.items():
        names = list(series)
        assert names[0] == "baseline" and any(n.startswith("quantize: blocks int8") for n in names), names
        assert all(len(ys) == len(series["baseline"]) for ys in series.values())
        others = [n for n in names if n != "baseline" and not n.startswith("plan: ")]
        assert any(series[n] != series["baseline"] for n in others), mode
        assert not any(n.startswith("plan: ") and series[n] == series["baseline"] for n in names)


def test_quantized_blocks_price_their_prefill_attention_on_the_kernel(tiny_graph, quick_calibration):
    """Blocks candidates that route long prefills to the bf16 kernel carry that in their estimate: the attention
    term is the calibrated kernel above 16 new tokens and SDPA at or below (decode, verify rows)."""
    from optpass.backends.cpu import prefill_attention
    from optpass.cost_models.model_cost import ATTENTION, PREFILL_KERNEL, forward_terms
    from optpass.passes.quantize import QuantizePass

    _, graph = tiny_graph
    spec = get_spec("cpu")
    assert "block_sparse" in quick_calibration and spec.sparse_call_floor is not None
    blocks = next(c for c in QuantizePass().candidates(graph, spec) if c.viable and c.label == "blocks int8")
    assert blocks.params["prefill_attention"] == prefill_attention.available()
    head = next(c for c in QuantizePass().candidates(graph, spec) if c.viable and c.label.startswith("lm_head"))
    assert not head.params["prefill_attention"] and ATTENTION not in overrides_for([head])
    kernel = forward_terms(graph, spec, {ATTENTION: PREFILL_KERNEL})["attention"]
    sdpa = forward_terms(graph, spec, {})["attention"]
    at = lambda s: {F.B: 1, F.S: s, F.S_ctx: s}  # noqa: E731
    assert F.evaluate(kernel.subs(at(16))) == pytest.approx(F.evaluate(sdpa.subs(at(16))))
    heads = {(a.num_heads, a.num_kv_heads, a.head_dim) for a in graph.attentions}
    want = sum(F.evaluate((F.sparse_attention_time(spec, h, kv, d, 1.0).subs(at(512)))) + spec.sparse_call_floor
               for a in graph.attentions for (h, kv, d) in [(a.num_heads, a.num_kv_heads, a.head_dim)])
    assert len(heads) == 1 and F.evaluate(kernel.subs(at(512))) == pytest.approx(want)
