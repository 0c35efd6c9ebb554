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
def document_quality(model: Any, ids: torch.Tensor, arms: dict[str, dict]) -> dict[str, Any]:
    from optpass.metrics import logits_kl, top1_agreement
    from optpass.passes.linear_attention import set_local

    half, results, reference = ids.shape[1] // 2, {}, None
    for arm, local in arms.items():
        set_local(model, local)
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
    ap.add_argument("--per-layer-len", type=int, default=4096)
    ap.add_argument("--passkey", default="4096,8192")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--parts", default="per_layer,document,decode,passkey", help="what to run after the pass")
    args = ap.parse_args()
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
