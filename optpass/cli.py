"""The `optpass` command line. Exit codes: 0 success, 2 usage error, 1 failure (one-line reason;
the traceback only with --verbose)."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable

from optpass.errors import OptpassError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = fn
        return fn

    return register


def _load_model(name: str):
    from optpass.models import BUILTIN_MODELS

    if name not in BUILTIN_MODELS:
        raise OptpassError(f"unknown model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name]()


@command("optimize")
def _optimize(args: argparse.Namespace) -> int:
    import torch

    import optpass

    torch.set_num_threads(args.threads) if args.threads else None
    model, _ = _load_model(args.model)
    passes = args.passes.split(",") if args.passes and args.passes != "auto" else "auto"
    optimized = optpass.optimize(model, target=args.target, passes=passes, quality_budget=args.quality_budget,
                                 objective=args.objective)
    report = optimized.optpass_report
    print(report)
    if args.report_json:
        with open(args.report_json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="optpass", description="Cost-model-driven rewrites for PyTorch models.")
    parser.add_argument("--verbose", action="store_true", help="print full tracebacks on failure")
    sub = parser.add_subparsers(dest="command", required=True)
    opt = sub.add_parser("optimize", help="optimize a model for a target and print the report")
    opt.add_argument("model", help="built-in model name (smollm2)")
    opt.add_argument("--target", default="cpu", help="cpu, cuda, h100, h200, a100, l4, rtx4090, m2, cpu-desktop")
    opt.add_argument("--passes", default="auto", help="'auto' or a comma-separated list of pass names")
    opt.add_argument("--quality-budget", default=None, help="e.g. 'ppl:2%%' or 'kl:0.05,top1:0.9'")
    opt.add_argument("--objective", default="latency", choices=["latency", "memory"])
    opt.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    opt.add_argument("--report-json", default=None, help="also write the report as JSON to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on usage errors
    try:
        return COMMANDS[args.command](args)
    except (OptpassError, ValueError, TypeError, FileNotFoundError) as e:
        if args.verbose:
            traceback.print_exc()
        print(f"optpass {args.command}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, (ValueError, TypeError)) else 1
    except Exception as e:  # noqa: BLE001 - one-line reason unless --verbose
        if args.verbose:
            traceback.print_exc()
        print(f"optpass {args.command}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
