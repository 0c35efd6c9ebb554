"""Choosing rewrites from candidates: a candidate is applied only when it is viable and, under `auto`,
when its predicted gain beats the cost model's own error band (so a predicted wash is never applied).

The band is the target's `HardwareSpec.error_band`: measured on a calibrated CPU (the calibration's spread),
wide (25%) on datasheet-only GPU specs, whose absolute times are not validated on this machine."""

from __future__ import annotations

from dataclasses import dataclass

from typing import Any

from torch import nn

from optpass.pass_base import Alternatives, Candidate, Option, Outcome

DEFAULT_ERROR_BAND = 0.05  # relative; used when no target band is given
OBJECTIVES = ("latency", "memory")


@dataclass(frozen=True)
class Decision:
    candidate: Candidate
    chosen: bool
    reason: str


def _gain(candidate: Candidate, objective: str) -> tuple[float, str]:
    est = candidate.estimate
    if objective == "latency":
        return est.relative_gain, f"predicted latency gain {est.relative_gain:+.1%}"
    return -est.d_peak_memory, f"predicted memory saving {-est.d_peak_memory / 2**20:+.1f} MiB"


def select(candidates: list[Candidate], auto: bool, objective: str = "latency",
           error_band: float | None = None, path: str = "module", band_note: str = "error band") -> list[Decision]:
    """Decide per candidate. Explicitly requested passes apply every viable candidate; `auto` needs a gain
    larger than the error band (latency) or any saving (memory). `path` is "module" or "graph"."""
    error_band = DEFAULT_ERROR_BAND if error_band is None else error_band
    threshold = error_band if objective == "latency" else 0.0
    decisions = []
    for cand in candidates:
        if not cand.viable:
            decisions.append(Decision(cand, False, cand.reason or "not applicable"))
        elif path not in cand.paths:
            decisions.append(Decision(cand, False, f"applies on the {'/'.join(cand.paths)} path only, not {path}"))
        elif cand.estimate is None:
            reason = "applied because requested (no cost estimate)" if not auto else "no cost estimate: auto skips it"
            decisions.append(Decision(cand, not auto, reason))
        else:
            gain, text = _gain(cand, objective)
            if auto and gain <= threshold:
                decisions.append(Decision(cand, False, f"{text} does not beat the {band_note} ({threshold:.0%}): not applied"))
            elif gain < 0:
                decisions.append(Decision(cand, True, f"{text}: a predicted loss, applied because requested"))
            else:
                decisions.append(Decision(cand, True, f"{text} beats the {band_note} ({threshold:.0%})" if auto else text))
    return decisions


def band_for(spec: object) -> tuple[float, str]:
    """The target's error band and how to name it in reasons."""
    band = getattr(spec, "error_band", DEFAULT_ERROR_BAND)
    if getattr(spec, "calibrated", False):
        return band, "calibrated error band"
    return band, "error band of the uncalibrated (ordering-only) spec"


def fastest_first(candidates: list[Candidate]) -> list[Candidate]:
    """Alternatives for one decision in the order to try them: the largest predicted latency saving first."""
    return sorted(candidates, key=lambda c: c.estimate.d_latency if c.estimate else 0.0)


def choose_within_budget(model: nn.Module, decisions: list[Alternatives], guard: Any
                         ) -> tuple[dict[str, Option | None], dict[str, list[Outcome]]]:
    """Per decision, apply its options in order and keep the first whose measured quality is within the
    guard's budget, undoing each one that is not. An option is measured when it brings its own `measure` or
    when there is an alternative to compare (a lone option is judged with the whole pass by the manager).
    A `monotone` decision (each option at least as aggressive as the next) is bisected instead."""
    kept: dict[str, Option | None] = {}
    outcomes: dict[str, list[Outcome]] = {}
    for decision in decisions:
        tried = outcomes.setdefault(decision.name, [])
        if decision.monotone and guard is not None and len(decision.options) > 2:
            kept[decision.name] = _bisect(model, decision.options, guard, tried)
            continue
        kept[decision.name] = None
        for option in decision.options:
            undo = option.apply(model)
            if option.measure is None and (guard is None or len(decision.options) == 1):
                tried.append(Outcome(option.label, "kept (no alternative to compare)"))
                kept[decision.name] = option
                break
            if _try(model, option, guard, tried):
                kept[decision.name] = option
                break
            undo()
    return kept, outcomes


def _try(model: nn.Module, option: Option, guard: Any, tried: list[Outcome]) -> bool:
    """Measure the applied `option`; record the outcome; True if within budget."""
    metrics = option.measure(model) if option.measure is not None else guard.evaluate(model)
    problems = guard.check(metrics) if guard is not None else []
    tried.append(Outcome(option.label, f"over budget: {'; '.join(problems)}" if problems else "within budget", metrics))
    return not problems


def _bisect(model: nn.Module, options: list[Option], guard: Any, tried: list[Outcome]) -> Option | None:
    """The most aggressive option within budget, when quality only worsens along `options` reversed: the
    mildest first (if it fails, none can pass), then a binary search; the kept option is left applied."""
    def within(i: int) -> bool:
        undo = options[i].apply(model)
        ok = _try(model, options[i], guard, tried)
        undo()
        return ok

    lo, hi = len(options) - 1, 0  # options[lo] is the mildest
    if not within(lo):
        return None
    best = lo
    left, right = hi, lo - 1  # search indices [left, right] for the most aggressive passing option
    while left <= right:
        mid = (left + right) // 2
        if within(mid):
            best, right = mid, mid - 1
        else:
            left = mid + 1
    options[best].apply(model)
    return options[best]
