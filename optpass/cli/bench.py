"""`optpass bench MODEL --target cpu`: optimize, then baseline and optimized side by side (interleaved
medians: prefill ms, decode tok/s, weight MiB, peak RSS, perplexity) and print the table."""

from __future__ import annotations

import argparse
import json

from optpass.cli import command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in name (smollm2, gemma3-270m), a Hugging Face causal LM directory or a .gguf file")
    p.add_argument("--target", default="cpu")
    p.add_argument("--passes", default="auto", help="'auto' or a comma-separated list of pass names")
    p.add_argument("--quality-budget", default=None, help="e.g. 'ppl:2%%'")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (medians)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the table as JSON to this file")


@command("bench", help="benchmark a model's baseline against its optimized version", add_arguments=add_arguments)
def run(args: argparse.Namespace) -> int:
    import torch

    import optpass
    from optpass.adapters import CausalLMAdapter
    from optpass.cli.validate import check_model_spec, check_names
    from optpass.errors import UnsupportedModelError
    from optpass.side_by_side import format_table, side_by_side
    from optpass.sources import load_model_source

    if args.rounds < 1 or args.new_tokens < 2 or args.prompt_tokens < 1:
        raise ValueError("--rounds >= 1, --new-tokens >= 2 and --prompt-tokens >= 1 are required")
    passes = args.passes.split(",") if args.passes and args.passes != "auto" else "auto"
    check_names(args.target, passes, args.quality_budget)
    check_model_spec(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model_source(args.model)
    if not CausalLMAdapter.matches(model):
        raise UnsupportedModelError(f"{args.model}: `optpass bench` measures causal LMs (prefill / decode / "
                                    f"perplexity); this is a {type(model).__name__}")
    optimized = optpass.optimize(model, target=args.target, passes=passes, quality_budget=args.quality_budget)
    applied = ", ".join(optimized.optpass_report.applied) or "none"
    rows = side_by_side(model, optimized, tokenizer, args.prompt_tokens, args.new_tokens, args.rounds)
    print(f"optpass bench: {args.model} -> {args.target} (applied: {applied}); {args.rounds} interleaved rounds, "
          f"medians; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, {torch.get_num_threads()} threads")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "target": args.target, "applied": applied, "rows": rows}, f, indent=2)
    return 0
