"""The pass registry: a dict filled by a decorator, looked up by name or by config type."""

from __future__ import annotations

from typing import TypeVar

from optpass.errors import UnknownPassError
from optpass.pass_base import Pass, PassConfig

_PASSES: dict[str, type[Pass]] = {}
P = TypeVar("P", bound=type[Pass])


def register_pass(cls: P) -> P:
    """Class decorator: make a pass available to `optimize(passes=[...])` under `cls.name`."""
    if cls.name in _PASSES and _PASSES[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} is already registered by {_PASSES[cls.name].__qualname__}")
    _PASSES[cls.name] = cls
    return cls


def unregister_pass(name: str) -> None:
    """Remove a pass (tests register throwaway passes)."""
    _PASSES.pop(name, None)


def _load_builtin() -> None:
    import optpass.passes  # noqa: F401 - importing registers the built-in passes


def registered_passes() -> dict[str, type[Pass]]:
    _load_builtin()
    return dict(_PASSES)


def get_pass(name: str) -> type[Pass]:
    passes = registered_passes()
    if name not in passes:
        raise UnknownPassError(f"unknown pass {name!r}; registered passes: {', '.join(sorted(passes))}")
    return passes[name]


def pass_for_config(config: PassConfig) -> Pass:
    """Instantiate the pass whose `config_cls` is `type(config)`."""
    for cls in registered_passes().values():
        if type(config) is cls.config_cls:
            return cls(config)
    raise UnknownPassError(
        f"no registered pass takes a {type(config).__name__}; registered: {', '.join(sorted(_PASSES))}"
    )
