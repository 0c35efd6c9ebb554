"""How well does the cost model predict what a rewrite does on this machine? SmolLM2-135M (or Gemma-3 270M with
`--model gemma3-270m`: shapes the calibration never saw, so the out-of-sample figure), every quantization
candidate applied alone (blocks int8 / int8 g32 / int4 g32 / g64 / g128, lm_head int8 / int8 g32 / int4) and the plan
`optimize(passes="auto")` would choose, timed at decode (M=1, eager `forward` with a 64-token KV cache) and
prefill (16 / 128 / 1024 tokens), all variants interleaved in one process (medians). Reports Kendall tau and
Spearman rho between predicted and measured latency change (measured as the median of per-round paired ratios;
tau on the ratio of medians is reported beside it), MdAPE of predicted latency, sign accuracy where the
measured effect exceeds 10%, top-1 of the chosen plan, and the auto plan's measured slowdowns.

    python benchmarks/cost_model_accuracy.py            # full: ~1 min calibration (if none cached) + ~14 min
    python benchmarks/cost_model_accuracy.py --quick    # harness check: 3 rewrites, 3 shapes, 2 rounds
    python benchmarks/cost_model_accuracy.py --model gemma3-270m
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import Variant, run_scenario  # noqa: E402
from optpass.capture import capture  # noqa: E402
from optpass.cost_models import calibrate as cal  # noqa: E402
from optpass.cost_models import get_spec  # noqa: E402
from optpass.cost_models.model_cost import overrides_for, predict_forward  # noqa: E402
from optpass.cost_models.selection import band_for, select  # noqa: E402
from optpass.hf_compat import with_cache  # noqa: E402
from optpass.models import load_gemma3_270m, load_smollm2  # noqa: E402
from optpass.pass_base import ApplyContext  # noqa: E402
from optpass.passes.quantize import QuantizeConfig, QuantizePass  # noqa: E402

CONTEXT = 64
REPEATS = {"decode_ms": 4, "prefill16_ms": 3, "prefill128_ms": 2}  # calls per timed sample (mean) below 1k tokens
REWRITES = {  # label -> (config, candidate label)
    "blocks int8": (QuantizeConfig(weights="int8", lm_head="keep"), "blocks int8"),
    "blocks int8 g32": (QuantizeConfig(weights="int8_grouped", lm_head="keep"), "blocks int8 g32"),
    "blocks int4 g32": (QuantizeConfig(weights="int4", group_size=32, lm_head="keep"), "blocks int4 g32"),
    "blocks int4 g64": (QuantizeConfig(weights="int4", group_size=64, lm_head="keep"), "blocks int4 g64"),
    "blocks int4 g128": (QuantizeConfig(weights="int4", group_size=128, lm_head="keep"), "blocks int4 g128"),
    "lm_head int8": (QuantizeConfig(weights="int8", lm_head="int8"), "lm_head int8"),
    "lm_head int8 g32": (QuantizeConfig(weights="int8", lm_head="int8_grouped"), "lm_head int8 g32"),
    "lm_head int4 g32": (QuantizeConfig(weights="int8", lm_head="int4"), "lm_head int4 g32"),
}
QUICK_REWRITES = ("blocks int8", "blocks int4 g32", "lm_head int8")


def shapes(quick: bool) -> dict[str, tuple[int, int]]:
    """Metric name -> (new tokens, context); decode is one token over a CONTEXT-token cache."""
    prefill = (16, 128) if quick else (16, 128, 1024)
    return {"decode_ms": (1, CONTEXT + 1), **{f"prefill{s}_ms": (s, s) for s in prefill}}


def apply(model: torch.nn.Module, cands: list[Any], spec: Any) -> torch.nn.Module:
    """A private copy with `cands` applied through the quantize pass (no quality guard, no fast decode)."""
    out = copy.deepcopy(model)
    by_cfg = QuantizePass(QuantizeConfig(fast_decode=False))
    return by_cfg.apply(out, cands, ApplyContext(target=spec)).model if cands else out


def measure_fn(shape_list: dict[str, tuple[int, int]], vocab: int):
    def measure(model: torch.nn.Module) -> dict[str, float]:
        out = {}
        with torch.inference_mode():
            for name, (s, ctx) in shape_list.items():
                ids, reps, spent = torch.randint(0, vocab, (1, s)), REPEATS.get(name, 1), 0.0
                for _ in range(reps):
                    t0 = time.perf_counter()
                    if name == "decode_ms":
                        model(input_ids=ids, **with_cache(model, model._bench_cache), use_cache=True)
                    else:
                        model(input_ids=ids, use_cache=False)
                    spent += time.perf_counter() - t0
                    if name == "decode_ms":
                        model._bench_cache.crop(-1)  # back to CONTEXT tokens
                out[name] = 1e3 * spent / reps
        return out
    return measure


def setup_fn(base: torch.nn.Module, cands: list[Any], spec: Any):
    def setup() -> torch.nn.Module:
        from transformers import DynamicCache

        model = apply(base, cands, spec).eval()
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(input_ids=torch.randint(0, model.config.vocab_size, (1, CONTEXT)), **with_cache(model, cache),
                  use_cache=True)
        model._bench_cache = cache
        return model
    return setup


def chosen_plan(graph: Any, spec: Any) -> tuple[list[Any], list[str]]:
    """What optimize(passes="auto") would choose for the quantize pass: selection under the target's error band,
    then per group the fastest predicted candidate (the quality guard is not run here)."""
    cands = QuantizePass().candidates(graph, spec)
    band, note = band_for(spec)
    decisions = select(cands, auto=True, error_band=band, band_note=note)
    best: dict[str, Any] = {}
    for d in decisions:
        if d.chosen and (d.candidate.params["group"] not in best
                         or d.candidate.estimate.d_latency < best[d.candidate.params["group"]].estimate.d_latency):
            best[d.candidate.params["group"]] = d.candidate
    return list(best.values()), [f"{d.candidate.label}: {'chosen' if d.chosen else 'skipped'} ({d.reason})"
                                 for d in decisions]


def statistics_of(points: list[dict[str, Any]]) -> dict[str, Any]:
    from scipy.stats import kendalltau, spearmanr

    pred = [p["pred_change"] for p in points]
    meas = [p["meas_change"] for p in points]
    big = [p for p in points if abs(p["meas_change"]) > 0.10]
    return {
        "points": len(points),
        "kendall_tau": float(kendalltau(pred, meas).statistic),
        "kendall_tau_ratio_of_medians": float(kendalltau(pred, [p["meas_change_ratio_of_medians"] for p in points]).statistic),
        "spearman_rho": float(spearmanr(pred, meas).statistic),
        "mdape_latency": statistics.median(p["ape"] for p in points),
        "mdape_speedup_ratio": statistics.median(
            abs((1 + p["pred_change"]) - (1 + p["meas_change"])) / (1 + p["meas_change"]) for p in points),
        "sign_accuracy_gt10pct": (sum((p["pred_change"] < 0) == (p["meas_change"] < 0) for p in big) / len(big))
        if big else None,
        "sign_points": len(big),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 rewrites, decode + prefill 16/128, 2 rounds")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 11, quick 2)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3-270m"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 11)
    record = cal.load()
    if record is None or (record.get("quick") and not args.quick):
        record = cal.calibrate(quick=args.quick)
        if not args.quick:
            cal.save(record)
    spec = cal.spec_from_record(record)
    model, _ = (load_gemma3_270m if args.model == "gemma3-270m" else load_smollm2)()
    model.eval()
    graph = capture(model)
    shape_list = shapes(args.quick)
    names = QUICK_REWRITES if args.quick else tuple(REWRITES)
    variants: list[tuple[str, list[Any]]] = [("baseline fp32", [])]
    for name in names:
        cfg, label = REWRITES[name]
        found = [c for c in QuantizePass(cfg).candidates(graph, spec) if c.label == label and c.viable]
        variants.append((name, found))
    plan, decisions = chosen_plan(graph, spec)
    variants.append(("auto plan: " + (" + ".join(c.label for c in plan) or "nothing"), plan))
    vocab = model.config.vocab_size
    bench = [Variant(n, setup_fn(model, cands, spec), measure_fn(shape_list, vocab),
                     note=f"sites: {sum(len(c.sites) for c in cands)}") for n, cands in variants]
    predicted = {n: {m: 1e3 * predict_forward(graph, spec, 1, s, ctx, overrides_for(cands))
                     for m, (s, ctx) in shape_list.items()} for n, cands in variants}
    suffix = "" if args.model == "smollm2" else "_" + args.model.replace("-", "_")
    result = run_scenario("cost_model_accuracy" + suffix + ("_quick" if args.quick else ""), bench, rounds=rounds,
                          extra={"calibration": spec.source["calibration"], "error_band": spec.error_band,
                                 "auto_decisions": decisions, "predicted_ms": predicted})
    stats = summarize(result, predicted, [n for n, _ in variants], shape_list, plan)
    if not args.quick and args.model == "smollm2" and stats.get("mdape_speedup_ratio") is not None:
        path = cal.record_validation(stats["mdape_speedup_ratio"], "benchmarks/cost_model_accuracy.py")
        print(f"validated error of predicted speedups ({stats['mdape_speedup_ratio']:.1%}) stored with the calibration: {path}")


def paired_change(samples: list[float], baseline: list[float]) -> float:
    """Measured latency change as the median over rounds of (variant / baseline in the same round) - 1.
    Rounds are interleaved, so a ratio within a round cancels this shared machine's slow phases (seen as
    whole rounds 20-30% slower for every variant); a ratio of medians can pair a fast-phase median with a
    slow-phase one."""
    return statistics.median(v / b for v, b in zip(samples, baseline)) - 1


def summarize(result: dict[str, Any], predicted: dict[str, dict[str, float]], names: list[str],
              shape_list: dict[str, tuple[int, int]], plan: list[Any]) -> dict[str, Any]:
    from benchmarks.harness import write

    rows = {r["variant"]: r for r in result["rows"]}
    measured = {n: {m: rows[n][m]["median"] for m in shape_list if m in rows[n]} for n in names}
    base, plan_name = names[0], names[-1]
    points, table = [], []
    for n in names[1:-1]:
        for m in shape_list:
            if m not in measured[n] or m not in measured[base]:
                continue
            pc = predicted[n][m] / predicted[base][m] - 1
            mc = paired_change(rows[n][m]["samples"], rows[base][m]["samples"])
            mc_medians = measured[n][m] / measured[base][m] - 1
            ape = abs(predicted[n][m] - measured[n][m]) / measured[n][m]
            points.append({"rewrite": n, "shape": m, "pred_change": pc, "meas_change": mc,
                           "meas_change_ratio_of_medians": mc_medians, "ape": ape})
            table.append(f"| {n} | {m} | {predicted[n][m]:.1f} | {measured[n][m]:.1f} | {pc:+.1%} | {mc:+.1%} | "
                         f"{mc_medians:+.1%} | {ape:.0%} |")
    stats = statistics_of(points) if len(points) >= 3 else {}
    top1 = {m: min((n for n in names if m in measured[n]), key=lambda n: measured[n][m], default=None) for m in shape_list}
    plan_labels = {c.label for c in plan}
    # conservative: a slowdown under either estimator counts, for each rewrite of the plan and the plan itself
    plan_points = [{"rewrite": plan_name, "shape": m, "meas_change": paired_change(rows[plan_name][m]["samples"], rows[base][m]["samples"]),
                    "meas_change_ratio_of_medians": measured[plan_name][m] / measured[base][m] - 1}
                   for m in shape_list if m in measured[plan_name] and m in measured[base]]
    slowdowns = [(p["rewrite"], p["shape"], round(max(p["meas_change"], p["meas_change_ratio_of_medians"]), 3))
                 for p in points + plan_points if (p["rewrite"] in plan_labels or p["rewrite"] == plan_name)
                 and max(p["meas_change"], p["meas_change_ratio_of_medians"]) > 0.05]
    result.update({"accuracy": stats, "accuracy_points": points, "measured_best": top1,
                   "plan_top1_at_decode": top1.get("decode_ms") == plan_name,
                   "plan_rewrites_measured_slower_than_5pct": slowdowns})
    write(result["scenario"], result)
    md = Path(__file__).parent / "results" / f"{result['scenario']}.md"
    extra = ["", "## Accuracy", "", *[f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in stats.items()],
             "", "## Predicted vs measured (ms, medians)", "",
             "| rewrite | shape | predicted | measured | predicted change | measured change (paired) | "
             "measured change (ratio of medians) | APE |",
             "|---|---|---|---|---|---|---|---|", *table, "",
             f"Baseline predicted / measured: " + ", ".join(
                 f"{m} {predicted[base][m]:.1f} / {measured[base].get(m, float('nan')):.1f}" for m in shape_list),
             f"Chosen plan `{plan_name}` predicted / measured: " + ", ".join(
                 f"{m} {predicted[plan_name][m]:.1f} / {measured[plan_name].get(m, float('nan')):.1f}" for m in shape_list),
             f"Measured best per shape: {top1}", f"Chosen plan is the measured best at decode: {result['plan_top1_at_decode']}",
             f"Plan (and its rewrites) measured >5% slower than fp32 under either estimator: {slowdowns}",
             "", "Auto decisions: ", *[f"- {d}" for d in result["auto_decisions"]], "", f"Calibration: {result['calibration']}"]
    md.write_text(md.read_text() + "\n".join(extra) + "\n")
    print("\n".join(extra))
    return stats


if __name__ == "__main__":
    main()
