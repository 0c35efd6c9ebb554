"""The pass manager: order the planned passes by their declared constraints, apply each on a private
copy, verify it, and keep it only if verification and the quality budget pass (else roll it back); then
install the one decode runtime the applied passes' contributions describe (`backends/runtime/`).

Copy-then-commit (as onnx-ir's pass wrapper does) makes rollback trivial and keeps the caller's
model untouched: a failed or over-budget pass is simply discarded, and the report says why.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import networkx as nx
from torch import nn

from optpass.errors import PassOrderError
from optpass.pass_base import ApplyContext, PassResult
from optpass.plan import Plan, PlanStep
from optpass.quality import QualityGuard
from optpass.report import PassRecord

# An extra check run after each pass (e.g. re-capture); returns a failure reason or None.
Verifier = Callable[[nn.Module], "str | None"]


def order_steps(steps: list[PlanStep]) -> list[PlanStep]:
    """Topologically order steps by `requires` / `runs_after`; error on cycles, missing requirements, conflicts."""
    by_name = {s.name: s for s in steps}
    g = nx.DiGraph()
    g.add_nodes_from(by_name)
    for step in steps:
        cls = type(step.pass_)
        for req in cls.requires:
            if req not in by_name:
                raise PassOrderError(f"pass {step.name!r} requires {req!r}, which is not in the plan; add it to passes=")
            g.add_edge(req, step.name)
        for before in cls.runs_after:
            if before in by_name:
                g.add_edge(before, step.name)
        for other in cls.conflicts:
            if other in by_name:
                raise PassOrderError(f"passes {step.name!r} and {other!r} conflict; choose one")
    try:
        order = list(nx.lexicographical_topological_sort(g, key=lambda n: [s.name for s in steps].index(n)))
    except nx.NetworkXUnfeasible as e:
        cycle = " -> ".join(a for a, _ in nx.find_cycle(g))
        raise PassOrderError(f"pass ordering constraints form a cycle: {cycle}") from e
    return [by_name[n] for n in order]


def decode_plan(records: list[PassRecord]) -> Any:
    """The `DecodePlan` the applied passes' runtime contributions add up to, in execution order."""
    from optpass.backends.runtime import DecodePlan

    plan = DecodePlan()
    for record in records:
        if record.status == "applied" and record.runtime:
            plan = plan.merge(record.name, record.runtime)
    return plan


class PassManager:
    """Runs a plan: for each step, copy -> apply -> verify -> commit or roll back."""

    def __init__(self, guard: QualityGuard | None, verifiers: tuple[Verifier, ...] = ()) -> None:
        self.guard = guard
        self.verifiers = verifiers

    def run(self, model: nn.Module, plan: Plan, context: ApplyContext,
            on_step: Callable[[str], None] | None = None) -> tuple[nn.Module, list[PassRecord]]:
        records: list[PassRecord] = []
        current = model
        for step in order_steps(plan.steps):
            if on_step:
                on_step(step.name)
            start = time.perf_counter()
            record, kept = self._run_step(current, step, context)
            record.seconds = time.perf_counter() - start
            records.append(record)
            if kept is not None:
                current = kept
        if any(r.runtime for r in records) and current is not model:
            from optpass.backends.runtime import install_runtime

            install_runtime(current, decode_plan(records))
        return current, records

    def _run_step(self, current: nn.Module, step: PlanStep, context: ApplyContext) -> tuple[PassRecord, nn.Module | None]:
        record = PassRecord(step.name, "skipped", config=step.pass_.config.to_dict())
        if not step.chosen:
            record.reason = step.why_none or "no candidate chosen"
            return record, None
        working = copy.deepcopy(current)
        try:
            result: PassResult = step.pass_.apply(working, step.chosen, context)
        except Exception as e:  # noqa: BLE001 - a crashing pass is rolled back, never propagated
            record.status, record.reason = "failed", f"apply raised {type(e).__name__}: {e}"
            return record, None
        record.sites, record.details = list(result.sites), dict(result.details)
        if not result.modified:
            record.reason = result.reason or "pass made no change"
            return record, None
        failure = self._verify(result.model, record)
        if failure:
            record.status, record.reason = "rolled_back", failure
            return record, None
        record.status, record.reason = "applied", result.reason  # an applied pass may still qualify what it did
        record.runtime = dict(result.runtime)
        return record, result.model

    def _verify(self, model: nn.Module, record: PassRecord) -> str | None:
        for verifier in self.verifiers:
            try:
                reason = verifier(model)
            except Exception as e:  # noqa: BLE001
                reason = f"{type(e).__name__}: {e}"
            if reason:
                return f"verification failed: {reason}"
        if self.guard is None:
            return None
        try:
            record.quality = self.guard.evaluate(model)
        except Exception as e:  # noqa: BLE001
            return f"rewritten model failed to run: {type(e).__name__}: {e}"
        problems = self.guard.check(record.quality)
        return f"over quality budget: {'; '.join(problems)}" if problems else None
