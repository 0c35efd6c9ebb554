"""`optpass explain MODEL --target T [--plot FILE.png]`: what the cost model predicts and would choose (a dry run)."""

from __future__ import annotations

import argparse
import json

from optpass.cli import command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in model name (smollm2)")
    p.add_argument("--target", default="cpu", help="cpu, cuda, h100, h200, a100, l4, rtx4090, m2, cpu-desktop")
    p.add_argument("--passes", default="auto", help="'auto' or a comma-separated list of pass names")
    p.add_argument("--objective", default="latency", choices=["latency", "memory"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (selects the matching cpu calibration)")
    p.add_argument("--plot", default=None, help="write predicted latency vs sequence length to this PNG")
    p.add_argument("--json", default=None, help="also write the explanation as JSON to this file")


@command("explain", help="show per-site predicted costs, every candidate with gain and crossover, and the plan",
         add_arguments=add_arguments)
def run(args: argparse.Namespace) -> int:
    import torch

    import optpass
    from optpass.cli.validate import check_names
    from optpass.models import load_builtin

    passes = args.passes.split(",") if args.passes and args.passes != "auto" else "auto"
    check_names(args.target, passes)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_builtin(args.model)
    result = optpass.explain(model, target=args.target, passes=passes, objective=args.objective)
    print(result)
    if args.plot:
        print(f"\nplot written to {result.plot(args.plot)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2, default=str)
    return 0
