"""`optpass optimize MODEL --target T [-o OUT]`: optimize, print the report, optionally write a checkpoint."""

from __future__ import annotations

import argparse
import json

from optpass.cli import command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="built-in model name (smollm2)")
    p.add_argument("--target", default="cpu", help="cpu, cuda, h100, h200, a100, l4, rtx4090, m2, cpu-desktop")
    p.add_argument("--passes", default="auto", help="'auto' or a comma-separated list of pass names")
    p.add_argument("--quality-budget", default=None, help="e.g. 'ppl:2%%' or 'kl:0.05,top1:0.9'")
    p.add_argument("--objective", default="latency", choices=["latency", "memory"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--report-json", default=None, help="also write the report as JSON to this file")


@command("optimize", help="optimize a model for a target and print the report", add_arguments=add_arguments)
def run(args: argparse.Namespace) -> int:
    import torch

    import optpass
    from optpass.models import load_builtin

    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_builtin(args.model)
    passes = args.passes.split(",") if args.passes and args.passes != "auto" else "auto"
    optimized = optpass.optimize(model, target=args.target, passes=passes, quality_budget=args.quality_budget,
                                 objective=args.objective)
    report = optimized.optpass_report
    print(report)
    if args.report_json:
        with open(args.report_json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0
