"""The three ways in, measured side by side: eager fp32, torch.compile (Inductor), torch.compile with the
optpass backend (graph int8 weight quantization, float head, then Inductor), and the optimize() model
reloaded from its checkpoint (optpass.load). Forward latency at an 8-token and a 128-token prompt (no KV
cache), interleaved rounds, medians; quality vs fp32 logits (top-1 agreement, rel-L2) and perplexity on
pydoc_data.topics; the checkpoint's optimize / save / load seconds and size.

    python benchmarks/interfaces.py            # SmolLM2-135M, 5 rounds (a few minutes: two Inductor compiles)
    python benchmarks/interfaces.py --quick    # tiny random Llama, 2 rounds (harness check)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import Variant, run_scenario  # noqa: E402

import optpass  # noqa: E402
from optpass.compile_backend import OptpassBackend  # noqa: E402
from optpass.quality import perplexity, rel_l2, top1_agreement  # noqa: E402

SHAPES = (8, 128)


def _ms(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, 2 rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OPTPASS_PROGRESS", "0")
    if args.quick:
        from optpass.models import tiny_llama

        model, tok, name = tiny_llama(), None, "interfaces_quick"
    else:
        from optpass.models import load_smollm2

        (model, tok), name = load_smollm2(), "interfaces_smollm2"
    rounds = args.rounds or (2 if args.quick else 5)
    vocab = model.config.vocab_size
    if tok is not None:
        from optpass.corpus import token_windows

        prompts = {s: token_windows(tok, s, 1, offset_windows=30) for s in SHAPES}
        evals = token_windows(tok, 256, 2)
    else:
        g = torch.Generator().manual_seed(0)
        prompts = {s: torch.randint(0, vocab, (1, s), generator=g) for s in SHAPES}
        evals = torch.randint(0, vocab, (2, 256), generator=g)
    with torch.inference_mode():
        reference = model(input_ids=prompts[SHAPES[-1]], use_cache=False).logits

    checkpoint: dict[str, float] = {}

    def from_checkpoint() -> Any:
        t = time.perf_counter()
        optimized = optpass.optimize(model, target="cpu", passes=["quantize"])
        checkpoint["optimize_s"] = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            optpass.save(optimized, d, tokenizer=tok)
            checkpoint["save_s"] = time.perf_counter() - t
            checkpoint["size_mib"] = sum(f.stat().st_size for f in Path(d).iterdir()) / 2**20
            t = time.perf_counter()
            loaded = optpass.load(d)
            checkpoint["load_s"] = time.perf_counter() - t
        return loaded

    def compiled(backend: Any) -> Any:
        return torch.compile(model, backend=backend)  # dynamo keeps one cache entry per backend

    arms = {
        "eager fp32": (lambda: model, "HF model, eager"),
        "compile inductor": (lambda: compiled("inductor"), "torch.compile(model), fp32"),
        "compile optpass": (lambda: compiled(OptpassBackend(target="cpu", passes=["quantize"])),
                            "torch.compile(model, backend='optpass'): int8 blocks, float head"),
        "optimize+load": (from_checkpoint, "optpass.optimize(passes=['quantize']) -> save -> load, eager forward"),
    }

    def measure(m: Any) -> dict[str, float]:
        with torch.inference_mode():
            return {f"forward{s}_ms": _ms(lambda s=s: m(input_ids=prompts[s], use_cache=False)) for s in SHAPES}

    def quality(m: Any) -> dict[str, Any]:
        with torch.inference_mode():
            logits = m(input_ids=prompts[SHAPES[-1]], use_cache=False).logits
            ppl = perplexity(m(input_ids=evals, use_cache=False).logits, evals)
        return {"top1_vs_fp32": top1_agreement(reference, logits), "rel_l2_vs_fp32": rel_l2(reference, logits),
                "perplexity": ppl}

    variants = [Variant(arm, setup, measure, quality, note) for arm, (setup, note) in arms.items()]
    run_scenario(name, variants, rounds=rounds, warmup=1, extra={"checkpoint": checkpoint})
    print(f"checkpoint: {checkpoint}")


if __name__ == "__main__":
    main()
