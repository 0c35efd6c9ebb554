"""`optimize_onnx(path)`: an ONNX model in, an optimized `.onnx` and an `OptimizationReport` out.

load (onnx-ir) -> index sites (graph_sites.py) -> candidates priced by the shared cost model (rewrites.py)
-> select -> per decision group, most aggressive first: rewrite a fresh copy, run it in ONNX Runtime, keep it
only if the quality against the original graph stays within the budget (else roll back to the last kept
state) -> write the optimized graph -> measure original vs optimized (interleaved medians) -> report.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from optpass.backends.onnx.evaluate import OnnxQualityGuard, default_feeds, open_session
from optpass.backends.onnx.export import spec_path
from optpass.backends.onnx.graph_sites import index_graph
from optpass.backends.onnx.rewrites import REWRITES, get_rewrite
from optpass.cost_models import get_spec, select
from optpass.cost_models.model_cost import baseline_latency
from optpass.errors import ConfigError, UnknownPassError, UnsupportedModelError
from optpass.measure import interleaved_times
from optpass.pass_base import Candidate
from optpass.progress import track
from optpass.report import CandidateRecord, OptimizationReport, PassRecord


@dataclass
class OnnxOptimizeResult:
    path: Path  # the optimized .onnx
    report: OptimizationReport

    def __str__(self) -> str:
        return f"{self.report}\nwrote {self.path}"


def _resolve(passes: str | list[str]) -> tuple[list[str], bool]:
    if passes == "auto":
        return sorted(REWRITES), True
    names = [p.strip() for p in passes.split(",")] if isinstance(passes, str) else list(passes)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise UnknownPassError(f"ONNX passes must be 'auto' or pass names from {sorted(REWRITES)}; got {passes!r}")
    for n in names:
        get_rewrite(n)  # raises with the known names
    return names, False


def _load(path: Path) -> ir.Model:
    try:
        return ir.load(str(path))
    except Exception as e:  # noqa: BLE001 - re-raised typed
        raise UnsupportedModelError(f"{path}: cannot load as ONNX ({type(e).__name__}: {e})") from e


def optimize_onnx(path: str | os.PathLike, target: str = "cpu", passes: str | list[str] = "auto",
                  quality_budget: Any = None, output: str | os.PathLike | None = None,
                  tokens: torch.Tensor | None = None, accuracy_level: int | None = None, threads: int | None = None,
                  measure_rounds: int = 5) -> OnnxOptimizeResult:
    """Optimize the ONNX model at `path` for ONNX Runtime on `target` (a CPU spec); see the module docstring.

    tokens: [n, S] token windows to measure an LM graph's quality on (default: seeded random ids).
    output: where to write (default `<stem>.optpass.onnx` beside the input).
    """
    from optpass.api import resolve_budget

    start = time.perf_counter()
    path = Path(path)
    if not path.exists():
        raise UnsupportedModelError(f"{path}: no such ONNX file")
    spec = get_spec(target)
    if spec.kind != "cpu":
        raise ConfigError(f"optimize_onnx plans for ONNX Runtime's CPU provider; target {target!r} is a {spec.kind}")
    names, auto = _resolve(passes)
    output = Path(output) if output else path.with_name(f"{path.stem}.optpass.onnx")
    stages = iter(track(range(4), "optpass optimize (onnx)", total=4))
    next(stages)
    model = _load(path)
    graph, linears = index_graph(model)
    budget = resolve_budget(quality_budget, graph.model_kind)
    report = OptimizationReport(target=spec.name, model=path.name, capture=graph.summary(), budget=budget.to_dict())

    next(stages)
    rewrites = {n: get_rewrite(n) for n in names}
    candidates: list[Candidate] = [c for r in rewrites.values() for c in r.candidates(graph, linears, spec)]
    decisions = select(candidates, auto=auto, path="graph")
    report.candidates = [
        CandidateRecord(d.candidate.pass_name, d.candidate.label, len(d.candidate.sites), d.chosen,
                        d.reason + (f"; {d.candidate.reason}" if d.chosen and d.candidate.reason else ""),
                        d.candidate.estimate.relative_gain if d.candidate.estimate else None,
                        d.candidate.estimate.d_peak_memory if d.candidate.estimate else None)
        for d in decisions]
    chosen = [d.candidate for d in decisions if d.chosen]
    del model  # each trial reloads: the original stays the rollback state

    next(stages)
    reference = open_session(path, threads)
    feeds, note = default_feeds(reference, tokens)
    guard = OnnxQualityGuard(reference, feeds, graph.model_kind == "causal_lm")
    report.notes.append(f"quality measured in ONNX Runtime against the original graph on {note}")
    report.quality_reference = dict(guard.reference_metrics)
    with tempfile.TemporaryDirectory() as tmp:
        kept, records = _apply(path, rewrites, chosen, guard, budget, accuracy_level, threads, Path(tmp))
        report.passes = records
        best = _build(path, rewrites, kept, accuracy_level)
        output.parent.mkdir(parents=True, exist_ok=True)
        ir.save(best, str(output))
    if spec_path(path).exists():
        shutil.copyfile(spec_path(path), spec_path(output))
    for rec in report.candidates:
        if rec.chosen and not any(c.label == rec.label and c.pass_name == rec.pass_name for c in kept):
            rec.chosen, rec.reason = False, f"not kept: {_why(records, rec)}"
    optimized = open_session(output, threads)
    report.quality_final = guard.evaluate(optimized)

    next(stages)
    _measure(report, reference, optimized, feeds[0], graph, spec, candidates=[c for c in kept if c.estimate],
             rounds=measure_rounds)
    report.memory = {"baseline_bytes": path.stat().st_size, "optimized_bytes": output.stat().st_size,
                     "predicted_optimized_bytes": path.stat().st_size + sum(c.estimate.d_peak_memory for c in kept
                                                                           if c.estimate)}
    report.notes.append("linears priced with the target's PyTorch-kernel GEMV efficiencies; ORT's MatMulNBits "
                        "is not calibrated separately")
    report.seconds = time.perf_counter() - start
    return OnnxOptimizeResult(output, report)


def _build(path: Path, rewrites: dict[str, Any], kept: list[Candidate], accuracy_level: int | None) -> ir.Model:
    model = _load(path)
    for name, rewrite in rewrites.items():
        mine = [c for c in kept if c.pass_name == name]
        if mine:
            rewrite.apply(model, mine, accuracy_level)
    return model


def _apply(path: Path, rewrites: dict[str, Any], chosen: list[Candidate], guard: OnnxQualityGuard, budget: Any,
           accuracy_level: int | None, threads: int | None, tmp: Path) -> tuple[list[Candidate], list[PassRecord]]:
    """Per pass and decision group, try the chosen alternatives best predicted gain first; keep the first
    within budget. Each trial is a fresh rewrite of the original file, so rollback is dropping the trial."""
    kept: list[Candidate] = []
    records = []
    for name in rewrites:
        mine = [c for c in chosen if c.pass_name == name]
        if not mine:
            records.append(PassRecord(name, "skipped", "no chosen candidate"))
            continue
        t0 = time.perf_counter()
        not_kept: dict[str, str] = {}
        sites: list[str] = []
        quality: dict[str, float] = {}
        groups: dict[str, list[Candidate]] = {}
        for c in mine:
            groups.setdefault(str(c.params.get("group", c.label)), []).append(c)
        for alternatives in groups.values():
            alternatives.sort(key=lambda c: -(c.estimate.relative_gain if c.estimate else 0.0))
            for cand in alternatives:
                trial_path = tmp / f"trial_{len(not_kept) + len(kept)}.onnx"
                ir.save(_build(path, rewrites, kept + [cand], accuracy_level), str(trial_path))
                metrics = guard.evaluate(open_session(trial_path, threads))
                problems = ["outputs contain NaN or inf"] if metrics.get("finite", 1.0) < 1 else budget.violations(metrics)
                trial_path.unlink()
                if problems:
                    not_kept[cand.label] = "; ".join(problems)
                    continue
                kept.append(cand)
                sites += list(cand.sites)
                quality = metrics
                break
        status = "applied" if sites else "rolled_back"
        reason = "" if sites else "every alternative broke the quality budget: " + "; ".join(
            f"{k}: {v}" for k, v in not_kept.items())
        records.append(PassRecord(name, status, reason, sites, quality, time.perf_counter() - t0,
                                  details={"not_kept": not_kept, "kept": [c.label for c in kept if c.pass_name == name]}))
    return kept, records


def _why(records: list[PassRecord], rec: CandidateRecord) -> str:
    for r in records:
        if r.name == rec.pass_name:
            return r.details.get("not_kept", {}).get(rec.label, "an alternative of its group was kept")
    return "not applied"


def _measure(report: OptimizationReport, reference: Any, optimized: Any, feed: dict[str, np.ndarray], graph: Any,
             spec: Any, candidates: list[Candidate], rounds: int) -> None:
    """Predicted vs measured ORT latency at the estimate shape: a decode step over a cache for LM graphs."""
    b, s, ctx = graph.estimate_shape
    if graph.model_kind == "causal_lm":
        feed = {k: (np.zeros((b, s), np.int64) if k == "input_ids" else
                    np.zeros((v.shape[0], v.shape[1], ctx - s, *v.shape[3:]), v.dtype) if v.ndim == 4 else v)
                for k, v in feed.items()}
        shape = f"ORT decode step, batch {b}, 1 token over a {ctx - s}-token cache"
    else:
        shape = "ORT forward on the first quality feed"
    times = interleaved_times({"baseline": lambda: reference.run(None, feed),
                               "optimized": lambda: optimized.run(None, feed)}, rounds=rounds)
    before = baseline_latency(graph, spec)
    gain = sum(c.estimate.relative_gain for c in candidates)
    report.latency = {"shape": shape, "baseline_ms": 1e3 * statistics.median(times["baseline"]),
                      "optimized_ms": 1e3 * statistics.median(times["optimized"]),
                      "predicted_baseline_ms": 1e3 * before, "predicted_optimized_ms": 1e3 * before * (1 - gain)}
