"""Choosing rewrites from candidates: a candidate is applied only when it is viable and, under `auto`,
when its predicted gain beats the cost model's own error band (so a predicted wash is never applied)."""

from __future__ import annotations

from dataclasses import dataclass

from optpass.pass_base import Candidate

DEFAULT_ERROR_BAND = 0.05  # relative; the cost-model issue replaces it with the calibrated band
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
           error_band: float = DEFAULT_ERROR_BAND, path: str = "module") -> list[Decision]:
    """Decide per candidate. Explicitly requested passes apply every viable candidate; `auto` needs a gain
    larger than the error band (latency) or any saving (memory). `path` is "module" or "graph"."""
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
                decisions.append(Decision(cand, False, f"{text} does not beat the error band ({threshold:.0%})"))
            elif gain < 0:
                decisions.append(Decision(cand, True, f"{text}: a predicted loss, applied because requested"))
            else:
                decisions.append(Decision(cand, True, text))
    return decisions
