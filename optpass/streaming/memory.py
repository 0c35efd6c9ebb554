"""How much memory this process may still use, and the rule that sends a checkpoint down the block-by-block
path when its fp32 weights cannot be held the way the in-memory `optimize()` holds them."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import lru_cache
from pathlib import Path

# the in-memory optimize() holds the fp32 model and the pass manager's working copy of it
IN_MEMORY_COPIES = 2


def gib(n: float) -> str:
    """A byte count for a person: GiB, or MiB below one GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def available_memory() -> int:
    """Bytes available to this process: MemAvailable, capped by a cgroup v2 limit when one is set."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(int(free), 0)


def too_big_for_memory(fp32_bytes: int) -> tuple[bool, str]:
    """Whether the in-memory path cannot hold this model, with the figures that say so."""
    need, free = IN_MEMORY_COPIES * fp32_bytes, available_memory()
    why = (f"fp32 weights {gib(fp32_bytes)}: optimizing in memory holds ~{gib(need)} (the model and the pass "
           f"manager's working copy), {gib(free)} available")
    return need > free, why


@lru_cache(maxsize=1)
def _libc_trim() -> object | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    return trim


def release_freed() -> None:
    """Hand memory freed by the last block back to the OS (glibc `malloc_trim`; a no-op elsewhere). Freed
    block-sized buffers otherwise stay in the heap, and over tens of blocks the fragments add up to more
    than a block."""
    trim = _libc_trim()
    if trim is not None:
        trim(0)
