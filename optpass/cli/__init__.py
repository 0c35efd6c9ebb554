"""The `optpass` command line: one module per command, registered with `@command`.

Exit codes, the same for every command: 0 success; 2 bad input (an unknown name, a malformed budget, a path that
is not a model or checkpoint, an option that does not apply): change the command; 1 a failure while running
(a one-line reason; the traceback only with --verbose). Names are checked before any model loads.
A command module defines `add_arguments(parser)` and `run(args) -> int` and decorates `run` with
`@command(name, help=..., add_arguments=...)`; importing it (see `_COMMAND_MODULES`) registers it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from optpass.errors import CheckpointError, OptpassError

Runner = Callable[[argparse.Namespace], int]
# errors that mean the command line asked for something that cannot be: exit code 2 (CheckpointError: a
# missing or corrupted checkpoint directory)
BAD_INPUT = (ValueError, TypeError, FileNotFoundError, CheckpointError)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Runner


COMMANDS: dict[str, Command] = {}
_COMMAND_MODULES = ("optimize", "explain", "calibrate", "run", "bench")


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]) -> Callable[[Runner], Runner]:
    def register(fn: Runner) -> Runner:
        COMMANDS[name] = Command(name, help, add_arguments, fn)
        return fn

    return register


def _load_commands() -> None:
    for module in _COMMAND_MODULES:
        try:
            importlib.import_module(f"optpass.cli.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"optpass.cli.{module}":
                raise


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    parser = argparse.ArgumentParser(prog="optpass", description="Cost-model-driven rewrites for PyTorch models.")
    parser.add_argument("--verbose", action="store_true", help="print full tracebacks on failure")
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="print full tracebacks on failure")
        cmd.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on usage errors
    try:
        return COMMANDS[args.command].run(args)
    except BAD_INPUT as e:
        if args.verbose:
            traceback.print_exc()
        print(f"optpass {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OptpassError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"optpass {args.command}: failed: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - one-line reason unless --verbose
        if args.verbose:
            traceback.print_exc()
        print(f"optpass {args.command}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
