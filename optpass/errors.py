"""Typed errors, all in one place, so callers can catch `OptpassError` and messages stay consistent.

A message names the thing at fault (pass, site, target, file) and what to do next.
"""

from __future__ import annotations


class OptpassError(Exception):
    """Base class of every error optpass raises on purpose."""


class UnknownTargetError(OptpassError, ValueError):
    """`target=` names no known hardware spec."""


class UnknownPassError(OptpassError, ValueError):
    """A pass name (or config type) that is not registered."""


class UnsupportedModelError(OptpassError, TypeError):
    """The input is not something optpass can optimize (not a module, no usable inputs, ...)."""


class CaptureError(OptpassError):
    """Neither `torch.export` nor the dynamo fallback could capture the model."""


class PassOrderError(OptpassError):
    """Pass constraints cannot be satisfied (a cycle, a missing requirement, a conflict)."""


class ConfigError(OptpassError, ValueError):
    """A config or budget field holds a value outside its allowed range."""


class VerificationError(OptpassError):
    """A rewritten model failed verification; the pass manager rolls the pass back."""


class CheckpointError(OptpassError):
    """A checkpoint is missing, corrupted, or written by an incompatible optpass."""


class ExportError(OptpassError, ValueError):
    """A model cannot be written in a serving engine's format (an architecture, layout or decision the format
    has no equivalent for)."""


class CalibrationError(OptpassError):
    """A calibration could not be trusted (a busy machine, implausible figures): it was not cached."""
