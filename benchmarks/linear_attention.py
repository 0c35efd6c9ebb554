"""Local layers (`optimize(passes=["linear_attention"])`, sliding_window method) on SmolLM2-135M (fp32), in one
process:

- the pass at the planned context under the budget: which layers it converted, each option it tried, its time;
- per layer alone: perplexity change / KL of the last tokens of a corpus window with only that layer made local
  (the per-layer quality the pass's ranking by attention mass stands in for);
- a long corpus document (disjoint from the pass's text): perplexity over all tokens and the second half, KL and
  top-1 vs the unconverted model; passkey retrieval at 4k and 8k (needle at several depths);
- decode at the context: KV-cache bytes allocated and one decode step's time, full static cache vs the same
  cache with sink + window rings for the converted layers (interleaved rounds, rotating order, median).

    python benchmarks/linear_attention.py [--context 8192] [--budget ppl:2%] [--window 1024] [--rounds 5]

`--method hedgehog` measures the learned variant instead (no timing), into results/linear_attention_hedgehog.*:

- per layer: attention transfer's relative output error with the identity-initialised maps and after fitting,
  the fitting seconds, and perplexity change / KL of a corpus window's last tokens with only that layer converted
  (identity maps, fitted maps);
- decode KV bytes at the context: a full layer's cache vs a hybrid layer's (sinks + window ring + linear state,
  the allocated tensors of the runtime's cache), and the whole model's for the plan;
- the pass under the budget at the context: the layers it converted (or its reason when none qualifies), the
  options it tried, its time.

    python benchmarks/linear_attention.py --method hedgehog [--context 8192] [--budget ppl:2%] [--window 1024]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import RESULTS, machine_info  # noqa: E402
from optpass.measure import interleaved_rounds  # noqa: E402


def per_layer(model: Any, layers: list[int], sink: int, window: int, length: int) -> dict[str, Any]:
    from optpass.long_context import EVAL_TAIL, corpus_ids, reference_logits, tail_quality
    from optpass.passes.linear_attention import set_local

    windows = corpus_ids(model, length, 1, 2)
    set_local(model, {})
    reference = reference_logits(model, windows, EVAL_TAIL)
    out = {}
    for i in layers:
        set_local(model, {i: (sink, window)})
        q = tail_quality(model, windows, reference)
        out[str(i)] = {k: round(v, 5) for k, v in q.items()}
        print(f"[bench] layer {i} alone: {out[str(i)]}", file=sys.stderr, flush=True)
    set_local(model, {})
    return out


@torch.no_grad()
def document_quality(model: Any, ids: torch.Tensor, arms: dict[str, dict], convert: Any = None) -> dict[str, Any]:
    """Per arm ({name: layers}, the first the reference): ppl over the document and its second half, KL and top-1
    of the second half vs the first arm. `convert(model, layers)` sets an arm up (default: plain local layers)."""
    from optpass.metrics import logits_kl, top1_agreement
    from optpass.passes.linear_attention import set_local

    half, results, reference = ids.shape[1] // 2, {}, None
    for arm, local in arms.items():
        (convert or set_local)(model, local)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        nll = F.cross_entropy(logits, ids[0, 1:], reduction="none")
        row = {"ppl": math.exp(float(nll.mean())), "ppl_second_half": math.exp(float(nll[half - 1:].mean()))}
        if reference is None:
            reference = logits[half - 1:]
        else:
            row.update(kl_second_half=logits_kl(reference[None], logits[half - 1:][None]),
                       top1_second_half=top1_agreement(reference[None], logits[half - 1:][None]))
        results[arm] = row
        print(f"[bench] document {arm}: {row}", file=sys.stderr, flush=True)
    base = results["full"]
    for row in results.values():
        row["ppl_increase"] = row["ppl"] / base["ppl"] - 1
    return results


def passkey(model: Any, tokenizer: Any, arms: dict[str, dict], lengths: list[int], depths: tuple[float, ...]) -> dict:
    from optpass.passes.linear_attention import set_local
    from optpass.quality import passkey_accuracy

    out = {}
    for arm, local in arms.items():
        set_local(model, local)
        out[arm] = {str(n): passkey_accuracy(model, tokenizer, n, depths, trials=1) for n in lengths}
        print(f"[bench] passkey {arm}: {out[arm]}", file=sys.stderr, flush=True)
    return out


@torch.no_grad()
def decode(model: Any, ids: torch.Tensor, arms: dict[str, dict], rounds: int, steps: int = 4) -> dict[str, Any]:
    """Per arm: KV bytes allocated and the median seconds of one decode step after a prefill of `ids`."""
    from optpass.backends.kv.cache import cache_nbytes, static_cache
    from optpass.hf_compat import with_cache
    from optpass.passes.linear_attention import set_local

    seq = ids.shape[1]
    state: dict[str, Any] = {}
    for arm, local in arms.items():
        set_local(model, local)
        cache = static_cache(model.config, seq + steps * (rounds + 2))
        model(input_ids=ids, **with_cache(model, cache), use_cache=True, logits_to_keep=1)
        state[arm] = {"cache": cache, "at": seq, "bytes": cache_nbytes(cache)}

    def step(arm: str):
        def run() -> dict[str, float]:
            set_local(model, arms[arm])
            s = state[arm]
            start = time.perf_counter()
            for _ in range(steps):
                model(input_ids=ids[:, -1:], **with_cache(model, s["cache"]), use_cache=True,
                      position_ids=torch.tensor([[s["at"]]]))
                s["at"] += 1
            return {"step_s": (time.perf_counter() - start) / steps}
        return run

    samples = interleaved_rounds({arm: step(arm) for arm in arms}, rounds=rounds)
    out = {arm: {"kv_bytes": state[arm]["bytes"], "step_ms": 1e3 * median(samples[arm]["step_s"])} for arm in arms}
    for row in out.values():
        row["step_speedup"] = out["full"]["step_ms"] / row["step_ms"]
    print(f"[bench] decode: {out}", file=sys.stderr, flush=True)
    return out


def hedgehog_per_layer(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Fit every full layer (as the pass does) and score each converted alone, identity vs fitted maps."""
    from optpass.backends.kv import enable_compressed_attention
    from optpass.backends.linear.feature_map import HedgehogMaps
    from optpass.backends.linear.fit import fit_layer, record_attention
    from optpass.hf_compat import full_attention_layers
    from optpass.long_context import EVAL_TAIL, corpus_ids, reference_logits, tail_quality
    from optpass.passes.linear_attention import set_hybrid

    enable_compressed_attention(model)
    full = full_attention_layers(model.config)
    records = record_attention(model, corpus_ids(model, args.calibration_len, 1, 0), set(full))
    windows = corpus_ids(model, args.per_layer_len, 1, 2)
    reference = reference_logits(model, windows, EVAL_TAIL)
    span = (args.sink, args.window)
    out = {}
    for i in full:
        rec = records.pop(i)
        fitted = fit_layer(rec, args.sink, args.window, args.fit_steps, seed=i)
        row: dict[str, Any] = {"error_before": fitted.error_before, "error_after": fitted.error_after,
                               "fit_s": fitted.seconds}
        for arm, maps in (("identity", HedgehogMaps(rec.query.shape[1], rec.key.shape[1], rec.query.shape[3])),
                          ("fitted", fitted.maps)):
            set_hybrid(model, {i: span}, {i: maps})
            row[arm] = tail_quality(model, windows, reference)
        set_hybrid(model, {}, {})
        out[str(i)] = row
        print(f"[bench] layer {i}: error {row['error_before']:.4f} -> {row['error_after']:.4f} "
              f"({row['fit_s']:.1f} s); ppl {row['identity']['ppl_increase']:+.2%} -> "
              f"{row['fitted']['ppl_increase']:+.2%}", file=sys.stderr, flush=True)
    return out


def hedgehog_document(optimized: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The plan on a held-out document of the context's length (disjoint from the pass's text): full vs plan."""
    from optpass.backends.linear.feature_map import maps_of
    from optpass.corpus import token_windows
    from optpass.hf_compat import attention_modules, linear_layers, local_layers
    from optpass.passes.linear_attention import set_hybrid

    modules = attention_modules(optimized)
    chosen = {i: local_layers(optimized.config)[i] for i in linear_layers(optimized.config)}
    maps = {i: maps_of(modules[i]) for i in chosen}
    doc = token_windows(args.tokenizer, window=args.context, count=1, offset_windows=3)
    return document_quality(optimized, doc, {"full": {}, "optpass plan": chosen},
                            convert=lambda m, layers: set_hybrid(m, layers, maps))


def hedgehog_kv_bytes(model: Any, context: int, sink: int, window: int) -> dict[str, int]:
    """Decode cache bytes at `context` of one full layer (the runtime's static layer) and of one hybrid layer
    (its allocated ring, bookkeeping and linear state), for one sequence."""
    from optpass.backends.kv.cache import PromptFirstLayer
    from optpass.backends.linear.hybrid import HybridLayer
    from optpass.hf_compat import text_config

    cfg = text_config(model.config)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    probe = torch.zeros(1, heads, 1, dim, dtype=next(model.parameters()).dtype)
    full, hybrid = PromptFirstLayer(context), HybridLayer(window, sink=sink)
    full.lazy_initialization(probe, probe)
    hybrid.lazy_initialization(probe, probe)
    full_bytes = sum(t.numel() * t.element_size() for t in (full.keys, full.values))
    return {"context": context, "full_layer": full_bytes, "hybrid_layer": hybrid.nbytes(),
            "hybrid_state": sum(t.numel() * t.element_size() for t in (hybrid.state, hybrid.norm)),
            "saved_per_layer": full_bytes - hybrid.nbytes()}


def hedgehog_markdown(result: dict[str, Any]) -> str:
    from optpass.long_context import EVAL_TAIL

    kv, plan = result["kv_bytes"], result["pass"]
    details = plan["details"]
    lines = ["# linear_attention, method=hedgehog, SmolLM2-135M (fp32)", "",
             f"`{result['command']}` ({result['date']}; {result['machine'].get('cpu', '')})", "",
             f"sinks {result['sink']} + window {result['window']} exact, every earlier token linear; "
             f"{result['fit_steps']} Adam steps of attention transfer per layer.", "",
             f"## The pass under `{result['budget']}` at {kv['context']} tokens ({result['optimize_s']:.0f} s)", "",
             f"status: **{plan['status']}**: {plan['reason']}", ""]
    for t in details.get("tried", []):
        q = t.get("quality", {})
        lines.append(f"- {t['label']}: {t['why']}" + (f" (ppl {q['ppl_increase']:+.2%}, KL {q['kl']:.4f}, top-1 "
                                                      f"{q['top1']:.3f} on {details.get('scored_tokens')} positions)"
                                                      if q else ""))
    if "kv_cache_bytes" in details:
        k = details["kv_cache_bytes"]
        lines += ["", f"whole model KV at {k['context']}: {k['full'] / 2**20:.1f} -> {k['hybrid'] / 2**20:.1f} MiB "
                  f"(saving {k['saving']:.1%})"]
    lines += ["", f"Decode KV cache at {kv['context']} tokens, one sequence: full layer {kv['full_layer'] / 2**20:.2f} "
              f"MiB, hybrid layer {kv['hybrid_layer'] / 2**20:.2f} MiB (of which linear state "
              f"{kv['hybrid_state'] / 2**20:.2f} MiB): {kv['saved_per_layer'] / 2**20:.2f} MiB saved per converted "
              "layer.", "",
              f"Per layer, the pass's fit on {details.get('calibration_tokens')} tokens ({result['fit_s_total']:.0f} s "
              "in all), ranked best first: relative output error of the layer (hybrid vs exact softmax, 256 query "
              "rows) with identity-initialised and fitted maps.", "",
              "| layer | error identity | error fitted | fit s | converted |", "|---|---|---|---|---|"]
    for i, r in details.get("layers", {}).items():
        lines.append(f"| {i} | {r['error_before']:.4f} | {r['error_after']:.5f} | {r['fit_s']:.1f} | "
                     f"{'yes' if r.get('converted') else ''} |")
    if "per_layer" in result:
        lines += ["", f"Per layer alone (fitted again on {result['calibration_len']} tokens): the same error, and ppl "
                  f"change / KL of the last {EVAL_TAIL} tokens of a {result['per_layer_len']}-token corpus window with "
                  "only that layer converted, identity-initialised vs fitted maps.", "",
                  "| layer | error identity | error fitted | fit s | ppl identity | ppl fitted | KL identity | KL fitted |",
                  "|---|---|---|---|---|---|---|---|"]
        for i, r in result["per_layer"].items():
            lines.append(f"| {i} | {r['error_before']:.4f} | {r['error_after']:.4f} | {r['fit_s']:.1f} | "
                         f"{r['identity']['ppl_increase']:+.2%} | {r['fitted']['ppl_increase']:+.2%} | "
                         f"{r['identity']['kl']:.4f} | {r['fitted']['kl']:.4f} |")
    if "document" in result:
        lines += ["", f"Held-out {kv['context']}-token document (disjoint from the pass's text):", "",
                  "| arm | ppl | ppl second half | KL second half | top-1 second half |", "|---|---|---|---|---|"]
        for arm, r in result["document"].items():
            lines.append(f"| {arm} | {r['ppl']:.3f} ({r['ppl_increase']:+.2%}) | {r['ppl_second_half']:.3f} | "
                         f"{r.get('kl_second_half', 0):.4f} | {r.get('top1_second_half', 1):.3f} |")
    return "\n".join(lines) + "\n"


def hedgehog_main(args: argparse.Namespace) -> None:
    import optpass
    from optpass.models import load_smollm2
    from optpass.passes.linear_attention import LinearAttentionConfig

    torch.manual_seed(0)
    model, args.tokenizer = load_smollm2()
    model.eval()
    result: dict[str, Any] = {
        "scenario": "linear_attention_hedgehog_smollm2", "command": " ".join(["python", *sys.argv]),
        "machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "budget": args.budget,
        "sink": args.sink, "window": args.window, "calibration_len": args.calibration_len,
        "fit_steps": args.fit_steps, "per_layer_len": args.per_layer_len,
        "kv_bytes": hedgehog_kv_bytes(model, args.context, args.sink, args.window)}
    started = time.perf_counter()
    optimized = optpass.optimize(model, passes=[LinearAttentionConfig(
        method="hedgehog", window=args.window, sink=args.sink, context=args.context,
        calibration_len=args.calibration_len, fit_steps=args.fit_steps)], quality_budget=args.budget)
    result["optimize_s"] = time.perf_counter() - started
    record = optimized.optpass_report.passes[0]
    result["pass"] = {"status": record.status, "reason": record.reason, "details": record.details}
    print(f"[bench] pass: {record.status}: {record.reason}", file=sys.stderr, flush=True)
    result["fit_s_total"] = record.details.get("fit_s_total", 0.0)
    if "document" in args.parts.split(",") and record.status == "applied":
        result["document"] = hedgehog_document(optimized, args)
    del optimized
    if "per_layer" in args.parts.split(","):
        result["per_layer"] = hedgehog_per_layer(model, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1, default=str))
    (RESULTS / f"{args.name}.md").write_text(hedgehog_markdown(result))
    print(hedgehog_markdown(result))


def main() -> None:
    import optpass
    from optpass.corpus import token_windows
    from optpass.hf_compat import FULL, layer_kinds, local_layers
    from optpass.models import load_smollm2
    from optpass.passes.linear_attention import LinearAttentionConfig, set_local

    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--budget", default="ppl:2%")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--per-layer-len", type=int, default=None, help="default 4096 (sliding_window), 2048 (hedgehog)")
    ap.add_argument("--passkey", default="4096,8192")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--parts", default="per_layer,document,decode,passkey", help="what to run after the pass")
    ap.add_argument("--method", default="sliding_window", choices=["sliding_window", "hedgehog"])
    ap.add_argument("--calibration-len", type=int, default=2048, help="hedgehog: tokens the maps are fitted on")
    ap.add_argument("--fit-steps", type=int, default=200, help="hedgehog: Adam steps per layer")
    ap.add_argument("--name", default="linear_attention_hedgehog", help="hedgehog: results file name")
    args = ap.parse_args()
    if args.method == "hedgehog":
        args.per_layer_len = args.per_layer_len or 2048
        return hedgehog_main(args)
    args.per_layer_len = args.per_layer_len or 4096
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    started = time.perf_counter()
    optimized = optpass.optimize(model.eval(), passes=[LinearAttentionConfig(
        window=args.window, sink=args.sink, context=args.context)], quality_budget=args.budget)
    optimize_s = time.perf_counter() - started
    print(optimized.optpass_report, flush=True)
    record = optimized.optpass_report.passes[0]
    chosen = local_layers(optimized.config)
    all_full = [i for i, k in enumerate(layer_kinds(model.config)) if k.kind == FULL and i not in chosen]
    layers = sorted(set(all_full) | set(chosen))
    set_local(optimized, {})
    arms = {"full": {}, "optpass plan": chosen, "all layers local": {i: (args.sink, args.window) for i in layers}}
    doc = token_windows(tokenizer, window=args.context, count=1, offset_windows=3)
    result: dict[str, Any] = {
        "scenario": "linear_attention_smollm2", "command": " ".join(["python", *sys.argv]), "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "budget": args.budget, "optimize_s": optimize_s,
        "pass": {"status": record.status, "reason": record.reason, "details": record.details},
    }
    parts = args.parts.split(",")
    if "per_layer" in parts:
        result["per_layer_alone"] = per_layer(optimized, layers, args.sink, args.window, args.per_layer_len)
    if "document" in parts:
        result["document"] = document_quality(optimized, doc, arms)
    if "decode" in parts:
        result["decode"] = decode(optimized, doc, arms, args.rounds)
    if "passkey" in parts:
        depths = tuple(float(x) for x in args.depths.split(","))
        result["passkey"] = passkey(optimized, tokenizer, {k: arms[k] for k in ("full", "optpass plan")},
                                    [int(x) for x in args.passkey.split(",") if x], depths)
    set_local(optimized, chosen)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("linear_attention_smollm2.json" if len(parts) == 4 else f"linear_attention_smollm2_{'_'.join(parts)}.json")
    path.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: result[k] for k in ("optimize_s", "document", "decode", "passkey") if k in result}, indent=1,
                     default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
