"""The Plan: what was chosen, where, with which resolved parameters. Read by apply, report, checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from optpass.pass_base import Candidate, Pass


@dataclass
class PlanStep:
    """One pass in the plan with the candidates chosen for it, in execution order."""

    pass_: Pass
    chosen: list[Candidate]
    why_none: str = ""  # when nothing was chosen: the candidates' reasons (what the report says)

    @property
    def name(self) -> str:
        return self.pass_.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass": self.name,
            "config": self.pass_.config.to_dict(),
            "chosen": [c.to_dict() for c in self.chosen],
        }


@dataclass
class Plan:
    """Ordered steps plus the target they were planned for."""

    target: str
    steps: list[PlanStep] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "steps": [s.to_dict() for s in self.steps]}
