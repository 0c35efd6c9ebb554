"""The optimization report: every candidate with its decision and reason, every pass with its outcome,
predicted vs measured latency and memory, and quality deltas. `str()` is a table, `to_dict()` is JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class CandidateRecord:
    pass_name: str
    label: str
    sites: int
    chosen: bool
    reason: str
    predicted_gain: float | None = None  # relative latency gain
    predicted_memory: float | None = None  # bytes, negative = saving
    crossover: float | None = None


@dataclass
class PassRecord:
    name: str
    status: str  # "applied" | "rolled_back" | "skipped" | "failed"
    reason: str = ""
    sites: list[str] = field(default_factory=list)
    quality: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)  # what an applied pass contributed to generation


@dataclass
class OptimizationReport:
    target: str
    model: str
    capture: dict[str, Any] = field(default_factory=dict)
    candidates: list[CandidateRecord] = field(default_factory=list)
    passes: list[PassRecord] = field(default_factory=list)
    budget: dict[str, Any] = field(default_factory=dict)
    quality_reference: dict[str, float] = field(default_factory=dict)
    quality_final: dict[str, float] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)  # baseline_ms, optimized_ms, predicted_*_ms
    memory: dict[str, float] = field(default_factory=dict)  # baseline_bytes, optimized_bytes, predicted_*
    plan: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def applied(self) -> list[str]:
        return [p.name for p in self.passes if p.status == "applied"]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=_jsonable))

    def __str__(self) -> str:
        lines = [f"optpass report: {self.model} -> target {self.target}  ({self.seconds:.1f}s)"]
        cap = self.capture
        lines.append(
            f"capture: {cap.get('method')} | {cap.get('blocks')} blocks, {cap.get('attentions')} attention sites "
            f"{cap.get('heads (q, kv)')}, {cap.get('linears')} linears"
        )
        lines += [f"  note: {n}" for n in cap.get("notes", [])]
        lines.append("candidates:")
        lines.append(_table(["pass", "candidate", "sites", "decision", "pred. gain", "reason"], [
            [c.pass_name, c.label or "-", str(c.sites), "chosen" if c.chosen else "rejected",
             _pct(c.predicted_gain), c.reason] for c in self.candidates
        ]))
        lines.append("passes:")
        lines.append(_table(["pass", "status", "sites", "quality", "s", "reason"], [
            [p.name, p.status, str(len(p.sites)), _quality(p.quality), f"{p.seconds:.1f}", p.reason] for p in self.passes
        ]))
        if self.latency:
            lat = self.latency
            lines.append(
                "latency (ms, measured median +-half range | predicted): baseline "
                f"{lat.get('baseline_ms', math.nan):.2f} +-{lat.get('baseline_spread', 0) / 2:.0%} | "
                f"{lat.get('predicted_baseline_ms', math.nan):.2f}, optimized {lat.get('optimized_ms', math.nan):.2f} "
                f"+-{lat.get('optimized_spread', 0) / 2:.0%} | {lat.get('predicted_optimized_ms', math.nan):.2f}"
                f"  [{lat.get('shape', '')}]"
            )
            lines += [f"  latency note: {n}" for n in lat.get("notes", [])]
        if self.memory:
            mem = self.memory
            lines.append(
                f"weights (MiB, measured | predicted): baseline {mem.get('baseline_bytes', 0) / 2**20:.1f}, optimized "
                f"{mem.get('optimized_bytes', 0) / 2**20:.1f} | {mem.get('predicted_optimized_bytes', 0) / 2**20:.1f}"
            )
        lines.append(f"quality budget {self.budget or '{}'}: reference {_quality(self.quality_reference)}; final "
                     f"{_quality(self.quality_final)}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def _quality(q: dict[str, float]) -> str:
    keys = ("ppl_increase", "perplexity", "kl", "top1", "cosine", "psnr", "rel_l2")
    parts = []
    for k in keys:
        if k in q:
            v = q[k]
            parts.append(f"{k}={v:+.2%}" if k == "ppl_increase" else f"{k}={v:.4g}")
    return " ".join(parts) or "-"


def _table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "  (none)"
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header) - 1)]
    fmt = "  " + "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    return "\n".join([fmt.format(*header), *(fmt.format(*r) for r in rows)])
