"""optpass: capture a PyTorch model, let a hardware cost model choose rewrites, verify them against a
quality budget, and return the optimized model with a report of every decision."""

from optpass.api import optimize
from optpass.capture import capture
from optpass.explain import Explanation, explain
from optpass.checkpoint import load, save
from optpass.errors import (
    CaptureError,
    CheckpointError,
    ConfigError,
    OptpassError,
    PassOrderError,
    UnknownPassError,
    UnknownTargetError,
    UnsupportedModelError,
    VerificationError,
)
from optpass.pass_base import ApplyContext, Candidate, Pass, PassConfig, PassResult
from optpass.quality import QualityBudget
from optpass.registry import get_pass, register_pass, registered_passes
from optpass.report import OptimizationReport
from optpass import cost_models  # noqa: F401  (optpass.cost_models.get_spec)

__version__ = "0.1.0"
__all__ = [
    "ApplyContext", "Candidate", "CaptureError", "CheckpointError", "ConfigError", "OptimizationReport",
    "OptpassError", "Pass", "PassConfig", "PassOrderError", "PassResult", "QualityBudget", "UnknownPassError",
    "UnknownTargetError", "UnsupportedModelError", "VerificationError", "capture", "Explanation", "explain", "get_pass", "load", "optimize",
    "register_pass", "registered_passes", "save",
]
