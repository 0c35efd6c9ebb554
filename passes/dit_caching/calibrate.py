"""Automatic calibration: the policy and threshold that compute the fewest block-steps within a quality budget.

Default thresholds of caching libraries either never fire on a new model or wreck it, because the signals
they threshold (residual change, modulated-input change) have model-specific scales. So the grids here are
derived from the model itself: one uncached sampling run on the calibration seeds records every step's
signals, and each policy's thresholds are multiples of that model's median per-step change. Every setting
is then scored on the final sampled images (the error compounds over the loop, so one forward would lie),
the cheapest one within budget (with a margin) is checked on held-out seeds, and both are reported.
Thresholds of one policy are searched by bisection (quality falls monotonically as they grow, up to noise).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from optpass.passes.dit_caching.policy import POLICIES, make_policy
from optpass.passes.dit_caching.stack import cache_controller, install_block_cache, remove_block_cache
from optpass.progress import track
from optpass.quality import QualityBudget
from optpass.sampling import image_metrics

SampleFn = Callable[[nn.Module, Sequence[int]], torch.Tensor]  # (model, seeds) -> final images

INTERVALS = (2, 3, 4, 5, 6, 8, 10, 12)
# multiples of the model's median per-step signal, least to most aggressive
SCALES = {"first_block": (0.75, 1.5, 3, 5, 8, 12, 18, 27), "teacache": (1.5, 2.5, 4, 6, 9, 14, 20, 30),
          "taylorseer_gated": (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4)}


@dataclass(frozen=True)
class Setting:
    """One point of the search: a policy, its parameters, and how many leading / trailing blocks always run."""

    policy: str
    params: dict[str, Any]
    n_first: int
    n_last: int

    @property
    def label(self) -> str:
        extra = "".join(f" {k}={v:.3g}" if isinstance(v, float) else f" {k}={v}" for k, v in self.params.items()
                        if k not in ("warmup", "max_skip"))
        return f"{self.policy}{extra} F{self.n_first}B{self.n_last}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Trial:
    setting: Setting
    computed_fraction: float
    metrics: dict[str, float]
    within_budget: bool

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.setting.label, "computed_fraction": self.computed_fraction, **self.metrics,
                "within_budget": self.within_budget}


@dataclass
class CalibrationResult:
    chosen: Setting | None
    reason: str = ""
    calibration: dict[str, float] = field(default_factory=dict)  # chosen setting on the calibration seeds
    holdout: dict[str, float] = field(default_factory=dict)  # ... and on the held-out seeds
    trials: list[Trial] = field(default_factory=list)
    best_per_policy: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen.to_dict() if self.chosen else None, "label": self.chosen.label if self.chosen else None,
                "reason": self.reason, "calibration": self.calibration, "holdout": self.holdout,
                "best_per_policy": self.best_per_policy, "trials": [t.to_dict() for t in self.trials]}


def _median(values: list[float | None]) -> float:
    vals = [v for v in values if v is not None and v > 0]
    return statistics.median(vals) if vals else 1e-3


def search_space(policies: Sequence[str], trace: list[dict[str, Any]], num_blocks: int, warmup: int, max_skip: int,
                 orders: Sequence[int] = (1, 2)) -> list[list[Setting]]:
    """Per (policy, structure), settings from least to most aggressive, scaled to the recorded signals."""
    probe = _median([t.get("probe_step_change") for t in trace])
    modulated = _median([t.get("modulated_change") for t in trace])
    base = {"first_block": probe, "teacache": modulated, "taylorseer_gated": probe}
    chains: list[list[Setting]] = []
    for name in policies:
        cls = POLICIES[name]
        first, last = cls.default_structure
        structures = [(first, last)] + ([(first, last + 1)] if first + last + 2 <= num_blocks else [])
        for nf, nl in structures:
            common = {"warmup": warmup, "max_skip": max_skip}
            variants = [{"order": o} for o in orders] if "order" in cls.__init__.__code__.co_varnames else [{}]
            for extra in variants:
                if name in SCALES:
                    thresholds = [base[name] * s for s in SCALES[name]]
                else:
                    thresholds = [float(i) for i in INTERVALS]
                chains.append([Setting(name, {"threshold": th, **common, **extra}, nf, nl) for th in thresholds])
    return chains


def run_setting(model: nn.Module, stack_path: str, setting: Setting | None, sample: SampleFn,
                seeds: Sequence[int], trace: bool = False) -> tuple[torch.Tensor, Any]:
    """Sample with `setting` installed (None: everything computed); returns images and the controller."""
    policy = make_policy(setting.policy, **setting.params) if setting else None
    controller = install_block_cache(model, stack_path, policy, setting.n_first if setting else 1,
                                     setting.n_last if setting else 0, trace=trace)
    images = sample(model, seeds)
    return images, controller


def _margin(budget: QualityBudget, margin_db: float) -> QualityBudget:
    return QualityBudget(min_psnr=None if budget.min_psnr is None else budget.min_psnr + margin_db,
                         max_rel_l2=None if budget.max_rel_l2 is None else budget.max_rel_l2 * 10 ** (-margin_db / 20))


def calibrate(model: nn.Module, stack_path: str, sample: SampleFn, budget: QualityBudget,
              calib_seeds: Sequence[int], holdout_seeds: Sequence[int], policies: Sequence[str],
              warmup: int = 2, max_skip: int = 12, margin_db: float = 1.0, holdout_tries: int = 3) -> CalibrationResult:
    """Search, check on held-out seeds, and leave the chosen cache installed on `model` (none if refused)."""
    if budget.min_psnr is None and budget.max_rel_l2 is None:
        return CalibrationResult(None, "the quality budget sets neither min PSNR nor max rel-L2 of the sampled images")
    reference, controller = run_setting(model, stack_path, None, sample, calib_seeds, trace=True)
    num_blocks = controller.num_blocks
    strict = _margin(budget, margin_db)
    chains = search_space(policies, controller.trace, num_blocks, warmup, max_skip)
    trials: list[Trial] = []

    def score(setting: Setting) -> bool:
        images, ctl = run_setting(model, stack_path, setting, sample, calib_seeds)
        metrics = image_metrics(reference, images)
        ok = not strict.violations(metrics) and bool(torch.isfinite(images).all())
        trials.append(Trial(setting, ctl.stats.computed_fraction, metrics, ok))
        return ok

    for chain in track(chains, "calibrating dit_cache", total=len(chains)):
        most_aggressive_passing(chain, score)
    result = CalibrationResult(None, trials=trials, best_per_policy=_best_per_policy(trials))
    passing = sorted((t for t in trials if t.within_budget), key=lambda t: (t.computed_fraction, -t.metrics["psnr"]))
    passing = [t for t in passing if t.computed_fraction < 0.999]
    if not passing:
        remove_block_cache(model)
        best = max(trials, key=lambda t: t.metrics["psnr"], default=None)
        result.reason = (f"no policy / threshold meets the budget {budget.to_dict()} on the calibration seeds"
                         + (f" (closest: {best.setting.label} at {best.metrics['psnr']:.1f} dB)" if best else ""))
        return result
    remove_block_cache(model)
    held_ref = sample(model, holdout_seeds)
    for trial in passing[:holdout_tries]:
        images, ctl = run_setting(model, stack_path, trial.setting, sample, holdout_seeds)
        held = {**image_metrics(held_ref, images), "computed_fraction": ctl.stats.computed_fraction}
        if not budget.violations(held):
            install_block_cache(model, stack_path, make_policy(trial.setting.policy, **trial.setting.params),
                                trial.setting.n_first, trial.setting.n_last)
            result.chosen, result.holdout = trial.setting, held
            result.calibration = {**trial.metrics, "computed_fraction": trial.computed_fraction}
            return result
        result.holdout[trial.setting.label] = held["psnr"]
    remove_block_cache(model)
    result.reason = (f"the {min(holdout_tries, len(passing))} cheapest settings within budget on the calibration "
                     f"seeds broke it on the held-out seeds (PSNR {result.holdout}); budget {budget.to_dict()}")
    return result


def most_aggressive_passing(chain: list[Setting], score: Callable[[Setting], bool]) -> int:
    """Binary search over a chain ordered by aggressiveness (quality falls as the threshold grows, so
    passing is a prefix): about log2(len) sampling runs instead of len. Returns the last passing index or -1."""
    lo, hi, best = 0, len(chain) - 1, -1
    while lo <= hi:
        mid = (lo + hi) // 2
        if score(chain[mid]):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def _best_per_policy(trials: list[Trial]) -> dict[str, dict[str, Any]]:
    best: dict[str, Trial] = {}
    for t in trials:
        if t.within_budget and (t.setting.policy not in best or t.computed_fraction < best[t.setting.policy].computed_fraction):
            best[t.setting.policy] = t
    return {name: {**t.to_dict(), "setting": t.setting.to_dict()} for name, t in best.items()}


__all__ = ["CalibrationResult", "Setting", "Trial", "calibrate", "cache_controller", "most_aggressive_passing",
           "search_space"]
