"""KV-cache compression speed and memory on SmolLM2-135M or Gemma-3 270M: batch-1 greedy decode (128 new tokens)
after a 2k / 4k-token prompt, full static cache vs fixed-budget compressed caches, int8 weights in every arm (so
that the cache is the larger share of the bytes a step reads), each arm a compiled static-shape decode step.
Gemma-3's sliding-window layers keep their 512-token window in every arm (packed like the compressed layers when
the arm packs); only its global layers are compressed. Reports decode tokens/s (prefill excluded), KV bytes
allocated (and their ratio to the full cache's), and (--peak-memory) each arm's peak RSS in its own process.
Quality is benchmarks/kv_quality.py's job.

    python benchmarks/kv_cache.py [--model gemma3-270m] [--quick] [--rounds 5] [--peak-memory]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import Variant, run_scenario  # noqa: E402
from optpass.backends.kv import CompressedKVCache, KVSettings, enable_compressed_attention  # noqa: E402
from optpass.backends.kv.cache import cache_nbytes  # noqa: E402
from optpass.backends.runtime import DecodeEngine, DecodePlan  # noqa: E402
from optpass.corpus import token_windows  # noqa: E402
from optpass.hf_compat import with_cache  # noqa: E402
from optpass.models import load_gemma3_270m, load_smollm2  # noqa: E402

MODELS = {"smollm2": load_smollm2, "gemma3-270m": load_gemma3_270m}

NEW = 128
ARMS: dict[str, KVSettings | None] = {  # name -> settings (None = full static cache)
    "full": None,
    "snapkv-int8@0.25": KVSettings(policy="snapkv", keep=0.25, bits=8),
    "snapkv-float@0.25": KVSettings(policy="snapkv", keep=0.25, bits=None),
    "snapkv-int8@0.125": KVSettings(policy="snapkv", keep=0.125, bits=8),
}


def int8_model(name: str = "smollm2") -> Any:
    """The model with int8 weights (blocks and head; Gemma-3's blocks with group scales, its GGUF's layout),
    the optpass way."""
    import optpass
    from optpass.passes.quantize import QuantizeConfig

    model, tok = MODELS[name]()
    blocks = "int8_grouped" if name == "gemma3-270m" else "int8"
    quantized = optpass.optimize(model, passes=[QuantizeConfig(weights=blocks, lm_head="int8", fast_decode=False)],
                                 quality_budget="ppl:5%")
    enable_compressed_attention(quantized)
    return quantized, tok


def variant(model: Any, prompt: torch.Tensor, arm: str, context: int, compile: bool = True) -> Variant:
    """The arm through optpass's decode runtime, exactly as the kv_cache pass's plan would install it."""
    settings = ARMS[arm]

    def setup() -> DecodeEngine:
        return DecodeEngine(model, DecodePlan(compiled_step=True, max_cache_len=context,
                                              kv=None if settings is None else asdict(settings)),
                            compile=compile)

    def measure(engine: DecodeEngine) -> dict[str, float]:
        engine.generate(prompt, NEW)
        t = engine.last_timing
        return {"decode_tok_s": t["decode_steps"] / t["decode_s"], "prefill_s": t["prefill_s"],
                "kv_MiB": cache_nbytes(engine.cache) / 2**20}

    return Variant(f"{arm} @ {context}", setup, measure, note="")


def peak_rss(arm: str, context: int, name: str) -> dict[str, float]:
    """In this (fresh) process: RSS before and after an eager generate through the arm's cache."""
    model, tok = int8_model(name)
    prompt = token_windows(tok, window=context - NEW, count=1, offset_windows=2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    settings = ARMS[arm]
    kwargs = {} if settings is None else with_cache(model, CompressedKVCache(settings, model.config))
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=16, do_sample=False, **kwargs)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_MiB": after / 1024, "growth_MiB": (after - before) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="512-token context, two arms, no compile: checks the harness")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--peak-memory", action="store_true", help="also each arm's peak RSS at 4k, one process per arm")
    ap.add_argument("--extra-arms", nargs="*", default=[], choices=[a for a in ARMS if a != "full"],
                    help="more budgets to time at 4k (e.g. snapkv-float@0.25 snapkv-int8@0.125)")
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--contexts", type=int, nargs="*", default=[2048, 4096],
                    help="contexts of the full vs snapkv-int8@0.25 pairs (each compressed context compiles its own step)")
    ap.add_argument("--peak-arm", nargs=2, metavar=("ARM", "CONTEXT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_arm:
        print(json.dumps(peak_rss(args.peak_arm[0], int(args.peak_arm[1]), args.model)))
        return
    model, tok = int8_model(args.model)
    plan = [("full", 512), ("snapkv-int8@0.25", 512)] if args.quick else \
        [(arm, c) for c in args.contexts for arm in ("full", "snapkv-int8@0.25")]
    plan += [(arm, 4096) for arm in args.extra_arms]  # each compressed arm costs ~8 min of C++ compile here
    prompts = {c: token_windows(tok, window=c - NEW, count=1, offset_windows=2) for c in {c for _, c in plan}}
    variants = [variant(model, prompts[c], arm, c, compile=not args.quick) for arm, c in plan]
    extra: dict[str, Any] = {"new_tokens": NEW}
    if args.peak_memory:
        extra["peak_memory_4k"] = {}
        for arm in ("full", "snapkv-int8@0.25"):
            out = subprocess.run([sys.executable, __file__, "--peak-arm", arm, "4096", "--model", args.model],
                                 capture_output=True, text=True)
            extra["peak_memory_4k"][arm] = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else \
                {"error": out.stderr.strip().splitlines()[-1]}
    suffix = "" if args.model == "smollm2" else "_" + args.model.replace("-", "_")
    result = run_scenario("kv_cache_speed" + suffix + ("_quick" if args.quick else ""), variants,
                          rounds=1 if args.quick else args.rounds, extra=extra)
    add_ratios(result)


def add_ratios(result: dict[str, Any]) -> None:
    """Each arm's KV bytes as a share of the full cache's at the same context."""
    from benchmarks.harness import write

    full = {row["variant"].split(" @ ")[1]: row["kv_MiB"]["median"] for row in result["rows"]
            if row["variant"].startswith("full") and "kv_MiB" in row}
    for row in result["rows"]:
        context = row["variant"].split(" @ ")[1]
        if "kv_MiB" in row and context in full:
            row["kv_vs_full"] = row["kv_MiB"]["median"] / full[context]
    write(result["scenario"], result)


if __name__ == "__main__":
    main()
