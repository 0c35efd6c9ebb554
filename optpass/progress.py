"""Progress display for long work (conversion, calibration, verification), quiet when not on a terminal."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def _enabled() -> bool:
    return os.environ.get("OPTPASS_PROGRESS", "1") != "0"


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a tqdm bar on stderr (disabled with OPTPASS_PROGRESS=0)."""
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=description, total=total, disable=not _enabled(), file=sys.stderr, leave=False)


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """Print a one-line status with its elapsed time when done."""
    start = time.perf_counter()
    if _enabled():
        print(f"[optpass] {message} ...", file=sys.stderr, flush=True)
    yield
    if _enabled():
        print(f"[optpass] {message}: done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
