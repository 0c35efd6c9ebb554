"""The pass API: a versioned config, candidates with cost estimates, and one `apply` per path.

A pass never mutates the user's config: everything resolved while planning (chosen sites, bit
widths, thresholds) goes into `Candidate.params`, which the `Plan` carries to `apply`, the report
and the checkpoint. Two application paths share that plan: `apply` rewrites modules of a live model
(so `generate()`, pipelines and `save_pretrained` keep working) and `rewrite_graph` rewrites an FX
graph (the `torch.compile` / export path). A pass without a graph path says so with a reason.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import fx, nn

if TYPE_CHECKING:
    from optpass.cost_models.estimate import RewriteEstimate
    from optpass.cost_models.hardware import HardwareSpec
    from optpass.sites import ModelGraph


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass config: frozen, versioned, JSON round-trippable. Validate in `__post_init__`."""

    version: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PassConfig:
        from optpass.errors import ConfigError

        data = dict(data)
        version = data.pop("version", cls.version)
        if version > cls.version:
            raise ConfigError(f"{cls.__name__}: config version {version} is newer than this optpass ({cls.version})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown fields {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class Candidate:
    """One rewrite the pass could make: where (sites), how (resolved params), and what the cost model predicts.

    A candidate that cannot be applied carries `reason` and `viable=False`; it is reported, never raised.
    """

    pass_name: str
    sites: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)
    estimate: RewriteEstimate | None = None
    viable: bool = True
    reason: str = ""
    label: str = ""  # short human name, e.g. "int8 blocks" or "lm_head int8"
    paths: tuple[str, ...] = ("module", "graph")  # where it can be applied: module-level and/or FX graph

    @classmethod
    def skip(cls, pass_name: str, sites: tuple[str, ...], reason: str, label: str = "") -> Candidate:
        return cls(pass_name=pass_name, sites=sites, viable=False, reason=reason, label=label)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass": self.pass_name,
            "label": self.label,
            "sites": list(self.sites),
            "params": self.params,
            "viable": self.viable,
            "paths": list(self.paths),
            "reason": self.reason,
            "estimate": self.estimate.to_dict() if self.estimate else None,
        }


@dataclass(frozen=True)
class PassResult:
    """What `apply` did. `modified=False` with a `reason` means the pass found nothing to do.

    When chosen candidates are alternatives (int8 vs int4 for the same sites), `details["not_kept"]` maps
    each label the pass tried and dropped to the reason, so the report can say why.
    """

    pass_name: str
    model: nn.Module | fx.GraphModule
    modified: bool
    sites: tuple[str, ...] = ()
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    # what the pass adds to generation (`DecodePlan` fields: a compiled step, a compressed cache layout, ...);
    # the pass manager merges the applied passes' parts and one runtime is installed after all passes
    runtime: dict[str, Any] = field(default_factory=dict)


@dataclass
class Option:
    """One alternative a pass offers for a decision (e.g. the LM head at int4). `apply` rewrites the model in
    place and returns the undo; `measure` scores the result (default: the quality guard's forward metrics, so
    a pass whose effect a single forward cannot see, a compressed cache, brings its own)."""

    label: str
    apply: Callable[[nn.Module], Callable[[], None]]
    measure: Callable[[nn.Module], dict[str, float]] | None = None
    value: Any = None  # what the pass needs back if this option is kept (a candidate, settings)


@dataclass
class Alternatives:
    """The options for one decision, in the order they should be tried (`cost_models.selection` ranks them);
    the first within the quality budget is kept."""

    name: str
    options: list[Option]
    # each option at least as aggressive as the next and quality worsening with aggressiveness (n removed
    # blocks, a keep ratio): the manager may bisect instead of trying them all
    monotone: bool = False


@dataclass
class Outcome:
    """What trying one option gave: its measured quality and why it was kept or not."""

    label: str
    why: str
    quality: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "why": self.why, **({"quality": self.quality} if self.quality else {})}


class Pass(ABC):
    """A rewrite family. Subclasses set `name` and `config_cls` and implement `candidates` and either `apply`
    (one fixed rewrite) or `decisions` + `finish` (alternatives tried under the quality budget by
    `cost_models.selection.choose_within_budget`, the one place that tries, measures and rolls back)."""

    name: ClassVar[str]
    config_cls: ClassVar[type[PassConfig]]
    requires: ClassVar[tuple[str, ...]] = ()  # passes that must also be in the plan, and run first
    runs_after: ClassVar[tuple[str, ...]] = ()  # ordering only: if both are planned, run after these
    conflicts: ClassVar[tuple[str, ...]] = ()  # passes that must not be in the same plan
    needs_calibration: ClassVar[bool] = False
    # False for a pass that changes the generation loop (how many forwards a token costs), not what one forward
    # computes: its predicted gain is not part of the report's one-forward latency prediction
    changes_forward: ClassVar[bool] = True

    def __init__(self, config: PassConfig | None = None) -> None:
        if config is None:
            config = self.config_cls()
        if not isinstance(config, self.config_cls):
            from optpass.errors import ConfigError

            raise ConfigError(f"pass {self.name!r} takes a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config

    @abstractmethod
    def candidates(self, graph: ModelGraph, target: HardwareSpec) -> list[Candidate]:
        """Find the sites this pass could rewrite and estimate each rewrite with the cost model."""

    def apply(self, model: nn.Module, chosen: list[Candidate], context: ApplyContext) -> PassResult:
        """Rewrite `model` (already a private copy) at the chosen candidates' sites, at module level. By
        default: each of `decisions()` is tried under the budget, then `finish()` builds the result."""
        from optpass.cost_models.selection import choose_within_budget

        decisions = self.decisions(model, chosen, context)
        if decisions is None:
            raise NotImplementedError(f"pass {self.name!r} implements neither apply() nor decisions()")
        if isinstance(decisions, PassResult):  # the pass found nothing to decide (a named reason)
            return decisions
        kept, outcomes = choose_within_budget(model, decisions, context.guard)
        return self.finish(model, kept, outcomes, context)

    def decisions(self, model: nn.Module, chosen: list[Candidate], context: ApplyContext) -> list[Alternatives] | PassResult | None:
        """The alternatives to try, per decision, in order; a `PassResult` when there is nothing to decide."""
        return None

    def finish(self, model: nn.Module, kept: dict[str, Option | None], outcomes: dict[str, list[Outcome]],
               context: ApplyContext) -> PassResult:
        """The result once every decision kept an option (or none, `kept[name] is None`)."""
        raise NotImplementedError

    def saved_state(self, model: nn.Module) -> dict[str, Any]:
        """JSON-able record of what this pass did to `model` beyond its weights (module layout, calibrated
        thresholds, skipped layers), written into a checkpoint's `optpass_state.json`. What it contributed to
        generation is recorded once for all passes, as the runtime's `DecodePlan`."""
        return {}

    def restore(self, model: nn.Module, state: dict[str, Any]) -> nn.Module:
        """Rebuild this pass's structure on a freshly built base model from `saved_state`'s record, without
        recalibrating; the checkpoint loads the weights (strictly) afterwards. Returns the model."""
        return model

    def rewrite_graph(self, gm: fx.GraphModule, chosen: list[Candidate]) -> PassResult:
        """Rewrite an FX graph from the same plan; passes without a graph form report why."""
        return PassResult(self.name, gm, modified=False, reason=f"{self.name} has no FX-graph rewrite")


@dataclass
class ApplyContext:
    """What `apply` may need beyond the model: calibration batches, the target, the captured graph, and the
    quality guard (so a pass can pick, per site, the most aggressive variant that stays within budget)."""

    target: HardwareSpec
    calibration: list[Any] = field(default_factory=list)
    graph: ModelGraph | None = None
    guard: Any = None  # optpass.quality.QualityGuard
