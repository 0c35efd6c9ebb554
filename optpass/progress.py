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
    """Iterate with a tqdm bar on a terminal's stderr; elsewhere (logs, CI) one plain line per item, since a
    bar's cursor movements leave escape fragments in a file. OPTPASS_PROGRESS=0 silences both."""
    if not _enabled():
        yield from items
        return
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=description, total=total, file=sys.stderr, leave=False)
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    start = time.perf_counter()
    for i, item in enumerate(items, 1):
        yield item
        print(f"[optpass] {description}: {i}/{total if total is not None else '?'} "
              f"({time.perf_counter() - start:.1f}s)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """Print a one-line status with its elapsed time when done."""
    start = time.perf_counter()
    if _enabled():
        print(f"[optpass] {message} ...", file=sys.stderr, flush=True)
    yield
    if _enabled():
        print(f"[optpass] {message}: done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
