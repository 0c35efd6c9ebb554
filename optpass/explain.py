"""`optpass.explain(model, target=...)`: a dry run of `optimize()`'s planning half. Nothing is applied.

It prints where the predicted time goes (per site group: compute- or memory-bound, share of the forward), every
candidate with its predicted gain, memory change and crossover, why each was chosen or skipped, and the plan;
`plot()` draws predicted latency vs sequence length for the baseline and the plan (prefill and decode).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from optpass.cost_models import formulas as F
from optpass.cost_models import get_spec
from optpass.cost_models.hardware import HardwareSpec
from optpass.cost_models.model_cost import forward_terms, overrides_for, predict_forward
from optpass.cost_models.selection import band_for, select
from optpass.sites import ModelGraph

SEQS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class Explanation:
    """What the cost model predicts for one model on one target, and what it would choose."""

    target: str
    calibration: str
    shape: tuple[int, int, int]  # (batch, new tokens, context) the plan is made at
    costs: list[dict[str, Any]] = field(default_factory=list)  # per term: name, ms, share, bound
    candidates: list[dict[str, Any]] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)
    predicted_ms: dict[str, float] = field(default_factory=dict)  # baseline, plan at `shape`
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # mode -> series -> ms per SEQS
    error_band: float = 0.0

    def __str__(self) -> str:
        b, s, ctx = self.shape
        lines = [f"target {self.target}: {self.calibration}",
                 f"shape: batch {b}, {s} new token(s), context {ctx}; predicted forward "
                 f"{self.predicted_ms['baseline']:.3f} ms -> plan {self.predicted_ms['plan']:.3f} ms", "",
                 "where the time goes:", f"  {'term':34s} {'ms':>9s} {'share':>6s}  bound"]
        for c in self.costs:
            lines.append(f"  {c['name']:34s} {c['ms']:9.3f} {c['share']:6.1%}  {c['bound']}")
        lines += ["", f"candidates (error band {self.error_band:.0%}):"]
        for c in self.candidates:
            gain = f"{c['gain']:+.1%}" if c["gain"] is not None else "  n/a"
            cross = f"crossover S={c['crossover']:.0f} ({c['crossover_note']})" if c["crossover"] else "no crossover <= 8k"
            mem = f"{c['d_memory_mib']:+.1f} MiB" if c["d_memory_mib"] is not None else ""
            lines.append(f"  [{'x' if c['chosen'] else ' '}] {c['pass']}: {c['label']:20s} gain {gain:>7s} {mem:>11s}  {cross}")
            lines.append(f"      {c['reason']}")
        lines += ["", "plan: " + (", ".join(self.plan) if self.plan else "nothing (no rewrite is predicted to pay here)")]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def plot(self, path: str) -> str:
        """Predicted latency vs sequence length: prefill (S = S_ctx) and decode (1 token over S_ctx), for the
        baseline, the plan, and each candidate alone (dashed), so crossovers show even when nothing is chosen."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, (mode, series) in zip(axes, self.curves.items()):
            for name, ys in series.items():
                style = {"color": "black", "lw": 2} if name == "baseline" else \
                    {"lw": 2} if name.startswith("plan: ") else {"ls": "--", "lw": 1}
                ax.plot(SEQS, ys, marker="o", ms=3, label=name, **style)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length S" if mode == "prefill" else "context length S_ctx (1 new token)")
            ax.set_ylabel("predicted ms per forward")
            ax.set_title(f"{mode} on {self.target}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _costs(graph: ModelGraph, spec: HardwareSpec, shape: tuple[int, int, int]) -> list[dict[str, Any]]:
    b, s, ctx = shape
    values = {k: 1e3 * F.evaluate(v, B=b, S=s, S_ctx=ctx) for k, v in forward_terms(graph, spec).items()}
    total = sum(values.values()) or 1.0
    rows = []
    for name, ms in sorted(values.items(), key=lambda kv: -kv[1]):
        if name.startswith("linear"):
            _, scheme, dims = name.split(" ")
            n, k = map(int, dims.split("x"))
            parts = F.op_parts(spec, "linear", scheme=scheme, n=n, k=k, rows=b * s)
        elif name == "attention":
            a = graph.attentions[0]
            parts = F.op_parts(spec, "attention", heads=a.num_heads, kv_heads=a.num_kv_heads, dim=a.head_dim,
                               q_len=s, ctx=ctx, causal=a.causal)
        else:
            parts = None
        if parts is None:
            bound = "dispatch / memory"
        else:
            bound = "compute" if parts["compute"] > parts["memory"] else "memory"
            bound += f" ({parts['flops'] / max(parts['bytes'], 1):.1f} FLOP/B)"
        rows.append({"name": name, "ms": ms, "share": ms / total, "bound": bound})
    return rows


def _crossover_note(cand: Any, graph: ModelGraph, spec: HardwareSpec) -> str:
    """Which side of the crossover the rewrite pays on."""
    x = cand.estimate.crossover
    o = overrides_for([cand])
    above = predict_forward(graph, spec, 1, int(x * 2) + 1, int(x * 2) + 1, o) < predict_forward(graph, spec, 1, int(x * 2) + 1, int(x * 2) + 1)
    return "pays above" if above else "pays below"


def _plan(decisions: list[Any]) -> list[Any]:
    """Per (pass, decision group) the fastest predicted chosen candidate: the one apply tries first."""
    best: dict[tuple[str, Any], Any] = {}
    for d in decisions:
        if not d.chosen or d.candidate.estimate is None:
            continue
        key = (d.candidate.pass_name, d.candidate.params.get("group"))
        if key not in best or d.candidate.estimate.d_latency < best[key].estimate.d_latency:
            best[key] = d.candidate
    return list(best.values())


def explain(model: nn.Module | str, target: str = "cpu", example_inputs: tuple[Any, ...] | None = None,
            example_kwargs: dict[str, Any] | None = None, passes: Any = "auto", objective: str = "latency",
            graph: ModelGraph | None = None) -> Explanation:
    """Plan `model` for `target` without applying anything; see the module docstring. `graph`: reuse a capture."""
    from optpass.api import _gather_candidates, resolve_passes
    from optpass.capture import capture

    if isinstance(model, str):
        from optpass.models import load_builtin

        model = load_builtin(model)[0]
    spec = get_spec(target)
    pass_list, auto = resolve_passes(passes)
    was_training = model.training
    model.eval()
    graph = graph or capture(model, example_inputs, example_kwargs)
    model.train(was_training)
    band, note = band_for(spec)
    decisions = select(_gather_candidates(pass_list, graph, spec), auto=auto, objective=objective,
                       error_band=band, band_note=note)
    plan = _plan(decisions)
    shape = graph.estimate_shape
    overrides = overrides_for(plan)
    out = Explanation(target=spec.name, calibration=spec.source.get("calibration", "datasheet figures (ordering only)"),
                      shape=shape, costs=_costs(graph, spec, shape), error_band=band,
                      predicted_ms={"baseline": 1e3 * predict_forward(graph, spec, *shape),
                                    "plan": 1e3 * predict_forward(graph, spec, *shape, overrides=overrides)})
    for d in decisions:
        est = d.candidate.estimate
        out.candidates.append({
            "pass": d.candidate.pass_name, "label": d.candidate.label or ",".join(d.candidate.sites[:2]),
            "chosen": d.candidate in plan, "reason": d.reason if d.candidate in plan or not d.chosen
            else f"{d.reason}; an alternative in its group is predicted faster and is tried first",
            "gain": est.relative_gain if est else None,
            "d_memory_mib": est.d_peak_memory / 2**20 if est else None,
            "crossover": est.crossover if est else None,
            "crossover_note": _crossover_note(d.candidate, graph, spec) if est and est.crossover else ""})
    out.plan = [f"{c.pass_name}: {c.label}" for c in plan]
    # the baseline, the plan (when there is one), and every candidate alone: where each crosses the baseline
    # is visible even when nothing is chosen
    variants: dict[str, dict | None] = {"baseline": None}
    if overrides:  # a plan of rewrites the forward formula models (a drafter's gain is per generated token)
        variants["plan: " + " + ".join(c.label for c in plan)] = overrides
    for d in decisions:  # (candidates whose cost the forward formula models: the linear-scheme rewrites)
        alone = overrides_for([d.candidate])
        if alone:
            variants.setdefault(f"{d.candidate.pass_name}: {d.candidate.label}", alone)
    shapes = {"prefill": lambda s: (1, s, s), "decode": lambda s: (1, 1, s)}
    out.curves = {mode: {name: [1e3 * predict_forward(graph, spec, *shape(s), overrides=o) if o else
                                1e3 * predict_forward(graph, spec, *shape(s)) for s in SEQS]
                         for name, o in variants.items()}
                  for mode, shape in shapes.items()}
    return out
