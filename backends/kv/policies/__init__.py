"""KV-cache eviction policies, one per module, behind `KVPolicy` (score tokens; the cache keeps the best).

Importing this package registers them in `POLICIES` by name.
"""

from optpass.backends.kv.policies.base import POLICIES, KVPolicy, get_policy, register_policy
from optpass.backends.kv.policies import h2o, snapkv, streaming  # noqa: F401  (registers)

__all__ = ["POLICIES", "KVPolicy", "get_policy", "register_policy"]
