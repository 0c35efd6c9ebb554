"""DiT block caching runtime: policies (one per module), the block-stack wrapper, forecasting, calibration.

Importing the package registers every policy in `POLICIES`.
"""

from optpass.passes.dit_caching import first_block, fixed_interval, taylorseer, teacache  # noqa: F401
from optpass.passes.dit_caching.calibrate import CalibrationResult, Setting, calibrate
from optpass.passes.dit_caching.policy import POLICIES, CachePolicy, StepSignal, make_policy, register_policy
from optpass.passes.dit_caching.stack import (
    BlockCacheController,
    CachedBlockStack,
    block_cache,
    cache_controller,
    install_block_cache,
    remove_block_cache,
)

__all__ = ["POLICIES", "BlockCacheController", "CachePolicy", "CachedBlockStack", "CalibrationResult", "Setting",
           "StepSignal", "block_cache", "cache_controller", "calibrate", "install_block_cache", "make_policy", "register_policy",
           "remove_block_cache"]
