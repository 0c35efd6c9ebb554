"""`optimize()`: capture -> candidates -> cost model -> apply -> verify -> report.

The caller's model is never mutated unless `inplace=True`; the returned model keeps its interface
(a Hugging Face LM still `generate()`s) and carries `optpass_report` and `optpass_plan`.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch import nn

from optpass.adapters import Batch, adapter_for
from optpass.capture import capture
from optpass.cost_models import get_spec, select
from optpass.cost_models.model_cost import predict_forward
from optpass.cost_models.selection import OBJECTIVES, band_for
from optpass.errors import ConfigError, UnknownPassError, UnsupportedModelError
from optpass.measure import interleaved_times, no_grad, weight_bytes
from optpass.pass_base import ApplyContext, Candidate, Pass, PassConfig
from optpass.pass_manager import PassManager, order_steps
from optpass.plan import Plan, PlanStep
from optpass.progress import track
from optpass.quality import QualityBudget, QualityGuard
from optpass.registry import get_pass, pass_for_config, registered_passes
from optpass.report import CandidateRecord, OptimizationReport

PassSpec = str | list[str | PassConfig | Pass]


def resolve_passes(passes: PassSpec) -> tuple[list[Pass], bool]:
    """`"auto"` -> every registered pass with its default config; else names / configs / pass objects."""
    if passes == "auto":
        return [cls() for _, cls in sorted(registered_passes().items())], True
    if isinstance(passes, str):
        passes = [p.strip() for p in passes.split(",") if p.strip()]
    if not isinstance(passes, (list, tuple)) or not passes:
        raise UnknownPassError(f"passes must be 'auto', a pass name, or a non-empty list; got {passes!r}")
    resolved: list[Pass] = []
    for item in passes:
        if isinstance(item, Pass):
            resolved.append(item)
        elif isinstance(item, PassConfig):
            resolved.append(pass_for_config(item))
        elif isinstance(item, str):
            resolved.append(get_pass(item)())
        else:
            raise UnknownPassError(f"cannot use {item!r} as a pass: give a name, a config object or a Pass")
    names = [p.name for p in resolved]
    if len(set(names)) != len(names):
        raise ConfigError(f"a pass is listed twice in {names}")
    return resolved, False


def resolve_budget(budget: QualityBudget | str | dict | None, kind: str) -> QualityBudget:
    if budget is None:
        return QualityBudget.default_for(kind)
    if isinstance(budget, QualityBudget):
        return budget
    if isinstance(budget, str):
        return QualityBudget.parse(budget)
    if isinstance(budget, dict):
        try:
            return QualityBudget(**budget)
        except TypeError as e:
            raise ConfigError(f"quality_budget: {e}") from e
    raise ConfigError(f"quality_budget must be a QualityBudget, str, dict or None; got {type(budget).__name__}")


def _gather_candidates(passes: list[Pass], graph: Any, spec: Any) -> list[Candidate]:
    found: list[Candidate] = []
    for p in passes:
        try:
            found.extend(p.candidates(graph, spec))
        except Exception as e:  # noqa: BLE001 - a pass that cannot plan is reported, not fatal
            found.append(Candidate.skip(p.name, (), f"candidates() raised {type(e).__name__}: {e}"))
    return found


def optimize(
    model: nn.Module,
    target: str = "cpu",
    example_inputs: tuple[Any, ...] | None = None,
    example_kwargs: dict[str, Any] | None = None,
    passes: PassSpec = "auto",
    quality_budget: QualityBudget | str | dict | None = None,
    calibration_data: Any = None,
    inplace: bool = False,
    objective: str = "latency",
    context: int | None = None,
    streaming: bool | None = None,
    output: str | None = None,
) -> nn.Module:
    """Optimize `model` for `target`; see the module docstring. Returns the optimized model.

    `context`: the context length (prompt + generated tokens) a causal LM will serve; the cost model plans
    its decode step there (KV-cache compression only pays at long contexts). Default: the example's length.
    `streaming`: for a Hugging Face (Llama) checkpoint directory with passes=["quantize"], quantize it block by
    block into the checkpoint directory `output` without building the fp32 model (`optpass/streaming/`);
    returns a `StreamingResult` (.path, .report). None (default): only when the fp32 weights, held twice
    in memory by this path, exceed the available memory (with a warning); False: never."""
    start = time.perf_counter()
    if isinstance(model, str) and model.endswith(".onnx"):
        # ONNX in, ONNX out: returns an OnnxOptimizeResult (.path, .report), see backends/onnx/optimize.py
        from optpass.backends.onnx import optimize_onnx

        return optimize_onnx(model, target=target, passes=passes, quality_budget=quality_budget)
    if streaming is not False:
        from optpass.streaming import route

        streamed = route(model, streaming, passes, output=output, target=target, quality_budget=quality_budget,
                         calibration_data=calibration_data)
        if streamed is not None:
            return streamed
    if isinstance(model, str):
        from optpass.sources import load_model_source

        model = load_model_source(model)[0]
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"optimize() needs a torch.nn.Module (or a built-in model name), got {type(model).__name__}")
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective={objective!r}; allowed: {', '.join(OBJECTIVES)}")
    spec = get_spec(target)
    pass_list, auto = resolve_passes(passes)
    order_steps([PlanStep(p, []) for p in pass_list])  # fail fast on cycles / conflicts, before any work
    adapter = adapter_for(model)
    budget = resolve_budget(quality_budget, adapter.kind)
    budget.check_measurable(adapter.metrics, adapter.kind)
    if context is not None and (not isinstance(context, int) or context < 2):
        raise ConfigError(f"context={context!r}: give the served context length in tokens (an int >= 2)")
    was_training = model.training
    model.eval()

    stages = iter(track(range(5), "optpass optimize", total=5))
    next(stages)
    graph = capture(model, example_inputs, example_kwargs)
    graph.context = context if graph.model_kind == "causal_lm" else None
    example = Batch(tuple(example_inputs or ()), dict(example_kwargs or {})) if (example_inputs or example_kwargs) \
        else adapter.example_batch(model)

    next(stages)
    candidates = _gather_candidates(pass_list, graph, spec)
    band, band_note = band_for(spec)
    decisions = select(candidates, auto=auto, objective=objective, path="module", error_band=band, band_note=band_note)
    report = OptimizationReport(target=spec.name, model=type(model).__name__, capture=graph.summary(), budget=budget.to_dict())
    report.candidates = [
        CandidateRecord(d.candidate.pass_name, d.candidate.label, len(d.candidate.sites), d.chosen, d.reason,
                        d.candidate.estimate.relative_gain if d.candidate.estimate else None,
                        d.candidate.estimate.d_peak_memory if d.candidate.estimate else None,
                        d.candidate.estimate.crossover if d.candidate.estimate else None)
        for d in decisions
    ]
    plan = Plan(target=spec.name, steps=[_plan_step(p, decisions) for p in pass_list])
    report.plan = plan.to_dict()
    if spec.name == "cpu":  # the figures behind every prediction: calibrated, uncalibrated, or ignored and why
        report.notes.append(f"target cpu: {spec.source.get('calibration', 'uncalibrated')}")
    if graph.model_kind == "causal_lm":
        ctx = graph.estimate_shape[2]
        source = "context=" if context else "the example's length; pass context= to plan for long-context serving"
        report.notes.append(f"planned for batch-1 decode at {ctx} tokens of context ({source})")

    next(stages)
    verify_batches, verify_note = adapter.data_batches(model, calibration_data, "verify", example)
    calib_batches, calib_note = adapter.data_batches(model, calibration_data, "calibrate", example)
    report.notes.append(f"quality measured on {verify_note}; calibration on {calib_note}")
    guard = QualityGuard(adapter, model, verify_batches, budget)
    report.quality_reference = dict(guard.reference_metrics)

    next(stages)
    if not any(step.chosen for step in plan.steps):
        report.notes.append("nothing to optimize: no pass had a chosen candidate for this model and target")
    context = ApplyContext(target=spec, calibration=calib_batches, graph=graph, guard=guard)
    optimized, report.passes = PassManager(guard).run(model, plan, context)
    if optimized is model:
        optimized = copy.deepcopy(model)
    applied = [r for r in report.passes if r.status == "applied"]
    if not auto:
        _warn_not_applied(report)
    _mark_not_kept(report)
    report.quality_final = applied[-1].quality if applied else dict(guard.evaluate(optimized))

    next(stages)
    _measure(report, model, optimized, example, graph, spec, {p.name for p in pass_list if not p.changes_forward})
    report.seconds = time.perf_counter() - start
    model.train(was_training)
    optimized.optpass_report = report
    optimized.optpass_plan = plan
    if inplace:
        _transplant(model, optimized)
        return model
    return optimized


def _measure(report: OptimizationReport, baseline: nn.Module, optimized: nn.Module, batch: Batch, graph: Any,
             spec: Any, loop_passes: set[str]) -> None:
    """Predicted vs measured latency at the graph's estimate shape (interleaved medians) and weight memory.
    The forward's predicted gain is the sum of the kept candidates' gains (each is the time saved at its own
    sites, a fraction of the whole forward); passes in `loop_passes` change how many forwards generation runs,
    not one forward, so they are left out of it and named in a note."""
    b, s, ctx = graph.estimate_shape
    if graph.model_kind == "causal_lm":
        batch = Batch(kwargs={"input_ids": torch.zeros(b, s, dtype=torch.long), "use_cache": False})
    predicted_base = predict_forward(graph, spec, b, s, ctx)
    kept = [c for c in report.candidates if c.chosen]  # after _mark_not_kept: alternatives dropped
    gain = sum(c.predicted_gain or 0.0 for c in kept if c.pass_name not in loop_passes)
    for c in kept:
        if c.pass_name in loop_passes and c.predicted_gain is not None:
            report.notes.append(f"{c.pass_name} ({c.label}): predicted {c.predicted_gain:+.1%} on generation, not "
                                "in the one-forward latency line (it changes the decode loop, not the forward)")
    times = interleaved_times({"baseline": no_grad(lambda: batch.run(baseline)),
                               "optimized": no_grad(lambda: batch.run(optimized))}, rounds=7)
    from optpass.cost_models.calibration_checks import busy
    from optpass.cost_models.selection import band_for
    from optpass.timing_trust import latency_notes, spread

    report.latency = {
        "shape": f"eager forward, batch {b} x {s} tokens",
        "baseline_ms": 1e3 * statistics.median(times["baseline"]),
        "optimized_ms": 1e3 * statistics.median(times["optimized"]),
        "baseline_spread": spread(times["baseline"]),
        "optimized_spread": spread(times["optimized"]),
        "predicted_baseline_ms": 1e3 * predicted_base,
        "predicted_optimized_ms": 1e3 * predicted_base * (1 - gain),
        "notes": latency_notes(times["baseline"], times["optimized"], gain, band_for(spec)[0],
                               busy() if spec.kind == "cpu" else None),
    }
    d_mem = sum(c.predicted_memory or 0.0 for c in kept)
    base_bytes = weight_bytes(baseline)
    report.memory = {"baseline_bytes": base_bytes, "optimized_bytes": weight_bytes(optimized),
                     "predicted_optimized_bytes": base_bytes + d_mem}


def _plan_step(p: Pass, decisions: list[Any]) -> PlanStep:
    mine = [d for d in decisions if d.candidate.pass_name == p.name]
    why = "; ".join(dict.fromkeys(d.reason for d in mine if not d.chosen and d.reason))
    return PlanStep(p, [d.candidate for d in mine if d.chosen], why_none=why)


def _warn_not_applied(report: OptimizationReport) -> None:
    """A pass the user asked for by name that did not apply is said out loud, not only in the report."""
    import warnings

    for record in report.passes:
        if record.status != "applied":
            warnings.warn(f"optpass: pass {record.name!r} was not applied ({record.status}): {record.reason}",
                          stacklevel=3)


def _mark_not_kept(report: OptimizationReport) -> None:
    """Chosen alternatives that a pass tried and dropped (or a rolled-back pass's candidates) are not chosen."""
    outcome = {r.name: r for r in report.passes}
    for rec in report.candidates:
        record = outcome.get(rec.pass_name)
        if not rec.chosen or record is None:
            continue
        if record.status != "applied":
            rec.chosen, rec.reason = False, f"{record.status}: {record.reason}"
        elif rec.label in record.details.get("not_kept", {}):
            rec.chosen, rec.reason = False, f"not kept: {record.details['not_kept'][rec.label]}"


def _transplant(target: nn.Module, source: nn.Module) -> None:
    """Make the caller's object become the optimized model (for `inplace=True`)."""
    target.__class__ = source.__class__
    target.__dict__ = source.__dict__
    torch.nn.Module.eval(target)
