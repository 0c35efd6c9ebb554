"""The decode runtime every stateful rewrite plugs into: passes contribute to a `DecodePlan`, the pass manager's
caller installs one `DecodeRuntime` (the only wrapper of `generate()`), and its engine runs the compiled
static-shape step, greedy or sampling, for batches with left padding (see ARCHITECTURE.md)."""

from optpass.backends.runtime.engine import DecodeEngine, cache_bucket
from optpass.backends.runtime.install import DecodeRuntime, install_runtime, runtime_plan
from optpass.backends.runtime.plan import DecodePlan

__all__ = ["DecodeEngine", "DecodePlan", "DecodeRuntime", "cache_bucket", "install_runtime", "runtime_plan"]
