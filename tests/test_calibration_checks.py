"""A calibration that knows when it is noisy: refused under synthetic load (or, if it ran, close to a quiet one),
implausible figures never cached, a corrupted or implausible cached file ignored with the reason in the spec, the
CLI's `--show`, and `optimize()`'s report naming the calibration state."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from optpass.cost_models import calibrate as cal
from optpass.cost_models import get_spec
from optpass.cost_models.calibration_checks import problems
from optpass.errors import CalibrationError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTPASS_CACHE", str(tmp_path))
    cal._LOADED.clear()
    yield tmp_path
    cal._LOADED.clear()


def _plausible() -> dict:
    """A record with the figures a quiet run of this VM gives (full calibration, 2 threads)."""
    linear = {"int8": {"bw": 20e9, "overhead": 15e-6, "rates": {"1": 40e9}, "spread": {"1": 0.1}}}
    return {"format": cal.FORMAT, "fingerprint": cal.fingerprint(), "quick": False, "shape": [576, 1536],
            "triad": {"bytes_per_s": 36e9, "spread": 0.1}, "linear": linear,
            "floors": {k: {"median": 8e-6} for k in ("glue", "op", "module", "sdpa")},
            "sdpa": {"128": {"flops_per_s": 50e9}}}


def test_the_bounds_catch_what_a_busy_calibration_looked_like():
    assert problems(_plausible()) == []
    busy = _plausible()
    busy["linear"]["int8"].update(bw=0.5e9, overhead=11_721e-6, spread={"1": 3.1})  # the figures
    found = " | ".join(problems(busy))
    assert "72x slower than the 36.0 GB/s triad" in found and "11,721 us" in found and "+-155%" in found
    fast = _plausible()
    fast["linear"]["int8"]["bw"] = 80e9
    assert "above 1.5x" in problems(fast)[0]
    assert "incomplete" in problems({"linear": {}})[0]
    assert "incomplete" in problems({k: v for k, v in _plausible().items() if k != "sdpa"})[0]


def test_quick_records_skip_the_streaming_bounds_but_keep_the_others():
    """Quick shapes (tests) sit in the cache, triad included: a tiny kernel 45x below a cache-resident triad is
    not an interrupted one. Overheads and spreads are still checked."""
    quick = _plausible()
    quick.update(quick=True, triad={"bytes_per_s": 150e9, "spread": 0.1})
    quick["linear"]["int8"]["bw"] = 3.4e9
    assert problems(quick) == []
    quick["linear"]["int8"].update(overhead=11_721e-6, spread={"1": 3.1})
    found = " | ".join(problems(quick))
    assert "11,721 us" in found and "+-155%" in found and "slower than" not in found


def test_calibration_under_synthetic_load_is_refused_or_close_to_a_quiet_one(cache):
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        try:
            loaded = cal.calibrate(quick=True, progress=False, backoff=(1.0,))
        except CalibrationError as exc:
            loaded = None
            assert "busy" in str(exc) and "nothing was cached" in str(exc)
    finally:
        loop.kill()
        loop.wait()
    assert cal.load() is None  # nothing was cached either way
    if loaded is not None:  # the probe let it run (more cores than threads): its figures must hold up
        quiet = cal.calibrate(quick=True, progress=False)
        assert loaded["triad"]["bytes_per_s"] == pytest.approx(quiet["triad"]["bytes_per_s"], rel=0.25)


def test_an_implausible_or_corrupted_cached_file_is_ignored_with_the_reason(cache):
    record = _plausible()
    record["linear"]["int8"]["overhead"] = 11_721e-6
    path = cal.save(record)
    spec = get_spec("cpu")
    assert not spec.calibrated and "ignored" in spec.source["calibration"]
    assert "11,721 us" in spec.source["calibration"]
    path.write_text("{not json")
    cal._LOADED.clear()
    assert "unreadable" in get_spec("cpu").source["calibration"]
    path.write_text(json.dumps(_plausible()))
    cal._LOADED.clear()
    assert get_spec("cpu").calibrated


def test_optimize_reports_the_ignored_calibration(cache):
    import optpass
    from optpass.models import tiny_llama

    record = _plausible()
    record["linear"]["int8"]["bw"] = 0.1e9
    cal.save(record)
    out = optpass.optimize(tiny_llama(), target="cpu", passes=["dead_code"], quality_budget=None)
    note = next(n for n in out.optpass_report.notes if n.startswith("target cpu:"))
    assert "ignored" in note and "slower than the 36.0 GB/s triad" in note


def test_cli_show_says_what_is_cached_and_whether_it_is_used(cache, capsys):
    from optpass.cli import main

    assert main(["calibrate", "--show"]) == 0
    assert "no calibration cached" in capsys.readouterr().out
    record = _plausible()
    record.update(taken_at="2026-12-03T08:00:00+00:00", seconds=61.0,
                  conditions={"loadavg_before": [0.1, 0, 0], "loadavg_after": [0.2, 0, 0],
                              "parallel_efficiency": {"triad": 0.93, "int8": 0.95}})
    cal.save(record)
    assert main(["calibrate", "--show"]) == 0
    out = capsys.readouterr().out
    assert "taken 2026-12-03T08:00:00+00:00 in 61 s" in out and "parallel efficiency 0.93-0.95" in out
    record["linear"]["int8"]["overhead"] = 1.0
    cal.save(record)
    assert main(["calibrate", "--show"]) == 0
    assert "not used:" in capsys.readouterr().out


def test_latency_notes_say_when_a_timing_cannot_be_trusted():
    from optpass.timing_trust import latency_notes

    steady = [0.060, 0.061, 0.059, 0.060, 0.062]
    faster = [0.022, 0.023, 0.022, 0.021, 0.022]
    assert latency_notes(steady, faster, 0.62, 0.10, None) == []  # measured 63% vs predicted 62%: nothing to say
    slower = [2.74, 2.5, 2.9, 2.7, 2.8]
    notes = latency_notes([0.535] * 5, slower, 0.6, 0.10, None)
    assert len(notes) == 1 and "measured slower than the baseline (2740.00 vs 535.00 ms)" in notes[0]
    off = latency_notes(steady, [0.050] * 5, 0.62, 0.10, None)
    assert "outside the +-10% error band" in off[0]
    noisy = latency_notes([0.06, 0.2, 0.06], [0.02, 0.02, 0.08], 0.62, 0.10,
                          "the machine is busy: a GEMM on 2 threads gave a 0.9x speedup over one thread")
    assert "timing ran while a GEMM on 2 threads gave a 0.9x speedup" in noisy[0] and "spread" in noisy[1]


def test_the_report_prints_spreads_and_latency_notes():
    from optpass.report import OptimizationReport

    report = OptimizationReport(target="cpu", model="M", capture={}, budget={})
    report.latency = {"baseline_ms": 535.0, "optimized_ms": 2740.0, "baseline_spread": 0.04, "optimized_spread": 0.1,
                      "predicted_baseline_ms": 500.0, "predicted_optimized_ms": 200.0, "shape": "s",
                      "notes": ["the optimized model measured slower than the baseline"]}
    text = str(report)
    assert "baseline 535.00 +-2% | 500.00, optimized 2740.00 +-5% | 200.00" in text
    assert "latency note: the optimized model measured slower" in text
