"""Hardware specs, roofline cost formulas and rewrite selection (installed as `optpass.cost_models`)."""

from optpass.cost_models.estimate import RewriteEstimate, op_time
from optpass.cost_models.hardware import SPECS, HardwareSpec, get_spec
from optpass.cost_models.selection import Decision, select

__all__ = ["SPECS", "Decision", "HardwareSpec", "RewriteEstimate", "get_spec", "op_time", "select"]
