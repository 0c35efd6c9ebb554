"""Whether the report's measured latency can be trusted, said in words next to the numbers.

On a busy machine `optimize()`'s own timing printed an optimized model five times slower than its baseline with
no remark, and a user cannot tell that from a real regression. So the report carries each side's spread, and
notes: when the optimized model measured slower than the baseline beyond the spread, when measured and
predicted gains disagree by more than the target's error band, when the rounds spread widely, and when the
busy-machine probe (`cost_models/calibration_checks.py`) found another job on the cores during timing.
"""

from __future__ import annotations

import statistics

WIDE_SPREAD = 0.5  # (max - min) / median of the timed rounds above which a median is not a steady figure


def spread(samples: list[float]) -> float:
    med = statistics.median(samples)
    return (max(samples) - min(samples)) / med if med > 0 else 0.0


def latency_notes(baseline: list[float], optimized: list[float], predicted_gain: float, band: float,
                  busy: str | None) -> list[str]:
    """The caveats for a baseline / optimized timing (seconds per round) against the predicted relative gain."""
    base, opt = statistics.median(baseline), statistics.median(optimized)
    noise = max(spread(baseline), spread(optimized))
    measured_gain = 1 - opt / base if base > 0 else 0.0
    advice = "re-measure on a quiet machine (`optpass bench`)"
    notes = []
    if busy is not None:
        notes.append(f"timing ran while {busy.removeprefix('the machine is busy: ')}: these figures are not "
                     f"this machine's; {advice}")
    if noise > WIDE_SPREAD:
        notes.append(f"the timed rounds spread +-{noise / 2:.0%}: the medians are not steady figures; {advice}")
    if opt > base * (1 + noise / 2):
        notes.append(f"the optimized model measured slower than the baseline ({opt * 1e3:.2f} vs {base * 1e3:.2f} "
                     f"ms) where {predicted_gain:+.1%} was predicted: {advice} before trusting either")
    elif abs(measured_gain - predicted_gain) > band + noise / 2:
        notes.append(f"measured gain {measured_gain:+.1%} vs predicted {predicted_gain:+.1%}: outside the "
                     f"+-{band:.0%} error band (and the rounds' +-{noise / 2:.0%} spread)")
    return notes
