"""Where a drafted call's time goes, part by part (grounded prompt, batch 1, SmolLM2 int8): the compiled plain
and verify steps by width, and the cache rollback, each timed per call; prefill / decode from the engine's own
split. A diagnostic, not a benchmark: one call per arm after a warm-up.

    python benchmarks/speculative_parts.py [--batch 4] [--proposer token_recycling]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import optpass.backends.kv.cache as kv_cache  # noqa: E402

from benchmarks.speculative import batched, int8_model, prompts, runtime_call  # noqa: E402

TIMES: dict[str, list[float]] = collections.defaultdict(list)


def timed(name: str, fn: Callable) -> Callable:
    def wrap(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        TIMES[name].append(time.perf_counter() - start)
        return out

    return wrap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1, help="prompts per call (left-padded)")
    ap.add_argument("--proposer", default="prompt_lookup")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = int8_model()
    engine = model.optpass_runtime.engine
    select = engine._select

    def timed_select(*args: Any, **kwargs: Any) -> Any:
        step_for, mask_length = select(*args, **kwargs)
        return (lambda width, stage=0: timed(f"step width {width}", step_for(width, stage))), mask_length

    engine._select = timed_select
    kv_cache.rollback = timed("rollback", kv_cache.rollback)  # the engine imports it per call
    rows = prompts(tok, "grounded", 2 * args.batch)
    calls = [(rows[0], None), (rows[1], None)] if args.batch == 1 else \
        [batched(tok, rows[i:i + args.batch]) for i in (0, args.batch)]
    for kind in (None, args.proposer):
        call = runtime_call(model, kind)
        call(*calls[0])  # warm-up (compiles on a cold cache)
        for _ in range(2):
            TIMES.clear()
            call(*calls[1])
            t = engine.last_timing
            print(f"\n{kind or 'no drafter'}: prefill {t['prefill_s'] * 1e3:.0f} ms, "
                  f"decode {t['decode_s'] * 1e3:.0f} ms, verifies {t['verify_steps']}, "
                  f"accepted drafts {t['accepted_drafts']}")
            for name, values in sorted(TIMES.items()):
                values = sorted(values)
                print(f"  {name}: n={len(values)} median {values[len(values) // 2] * 1e3:.2f} ms, "
                      f"sum {sum(values) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
