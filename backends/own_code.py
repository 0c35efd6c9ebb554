"""A copy of a function with its own code object, for `torch.compile`.

Dynamo caches compiled graphs, and counts recompiles against its limit, per code object. Two callers that must
not share either (two decode engines whose guards are skipped, two FlexAttention configurations) each compile
their own copy."""

from __future__ import annotations

import itertools
import types

_IDS = itertools.count()


def own_code(fn: types.FunctionType, prefix: str) -> types.FunctionType:
    """`fn` with a fresh code object named `<prefix>_<n>` (same globals, defaults and closure)."""
    code = fn.__code__.replace(co_name=f"{prefix}_{next(_IDS)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
