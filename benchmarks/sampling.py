"""Sampling on the decode runtime's compiled path vs greedy on the same path, SmolLM2-135M int8 (blocks + head).

Batch 1, 128 new tokens after the corpus' first 64 tokens, through `model.generate()` exactly as a user calls
it: greedy (`do_sample=False`) and sampling (`do_sample=True, temperature=0.7, top_p=0.9`, `torch.manual_seed`
before each call). Both arms run the same compiled step; the sampling arm adds transformers' own logits
processors and a multinomial draw per token. transformers' own loop on the same int8 model samples as the
reference. Decode tok/s excludes prefill (the engine's own timing; for transformers' loop the whole call, with
its prefill, is timed as the closest available figure). EOS is disabled so every call makes 128 tokens.

    python benchmarks/sampling.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import Variant, run_scenario  # noqa: E402
from optpass.corpus import token_windows  # noqa: E402

NEW = 128
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_p": 0.9}


def int8_model() -> tuple[Any, Any]:
    import optpass
    from optpass.models import load_smollm2
    from optpass.passes.quantize import QuantizeConfig

    model, tok = load_smollm2()
    return optpass.optimize(model, passes=[QuantizeConfig(weights="int8", lm_head="int8")]), tok


def runtime_arm(model: Any, prompt: torch.Tensor, name: str, options: dict[str, Any]) -> Variant:
    def measure(_: Any) -> dict[str, float]:
        torch.manual_seed(0)
        calls = model.optpass_runtime.fast_calls
        out = model.generate(prompt, max_new_tokens=NEW, eos_token_id=None, **options)
        assert model.optpass_runtime.fast_calls == calls + 1 and out.shape[1] == prompt.shape[1] + NEW
        t = model.optpass_runtime.engine.last_timing
        return {"decode_tok_s": t["decode_steps"] / t["decode_s"]}

    return Variant(name, lambda: None, measure, note=f"model.generate({options}) on the compiled path")


def transformers_arm(model: Any, prompt: torch.Tensor) -> Variant:
    def measure(_: Any) -> dict[str, float]:
        torch.manual_seed(0)
        start = time.perf_counter()
        with torch.inference_mode():
            type(model).generate(model, prompt, max_new_tokens=NEW, eos_token_id=None, **SAMPLING)
        return {"decode_tok_s": NEW / (time.perf_counter() - start)}

    return Variant("transformers-loop-sample", lambda: None, measure,
                   note="transformers' own generate() loop on the same int8 model (whole call timed)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    model, tok = int8_model()
    prompt = token_windows(tok, 64, 1)
    variants = [runtime_arm(model, prompt, "optpass-greedy", {"do_sample": False}),
                runtime_arm(model, prompt, "optpass-sample", SAMPLING), transformers_arm(model, prompt)]
    result = run_scenario("sampling_smollm2", variants, rounds=args.rounds)
    rates = {row["variant"]: row["decode_tok_s"]["median"] for row in result["rows"] if "decode_tok_s" in row}
    if {"optpass-greedy", "optpass-sample"} <= set(rates):
        print(f"sample / greedy: {rates['optpass-sample'] / rates['optpass-greedy']:.3f}x")


if __name__ == "__main__":
    main()
