"""Baseline vs optimized causal LM, side by side in one process (what `optpass bench` prints).

Every timed figure is an interleaved median (`optpass.measure.interleaved_times`): prefill ms (one forward
over the prompt), decode tok/s ((new - 1) tokens over generate time minus prefill time; the optimized arm
takes its `generate()`, i.e. the compiled static decode when the quantize pass installed it, compiled in the
warm-up round), weight MiB, peak extra RSS during one generate call (sampled every ms from /proc), and
perplexity on the corpus' verify slice.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any

import torch
from torch import nn

from optpass.measure import interleaved_times, weight_bytes
from optpass.progress import track
from optpass.quality import perplexity


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_during(fn: Any) -> float:
    """Bytes the process's RSS rose above its starting point while `fn` ran (Linux; NaN elsewhere)."""
    if not os.path.exists("/proc/self/statm"):
        fn()
        return float("nan")
    start, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return float(max(peak[0], _rss()) - start)


def _inputs(model: nn.Module, tokenizer: Any, prompt_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        return torch.randint(0, vocab, (1, prompt_tokens), generator=g), torch.randint(0, vocab, (2, 256), generator=g)
    from optpass.corpus import token_windows

    return token_windows(tokenizer, prompt_tokens, 1, offset_windows=40), token_windows(tokenizer, 256, 2)


def side_by_side(baseline: nn.Module, optimized: nn.Module, tokenizer: Any, prompt_tokens: int = 128,
                 new_tokens: int = 32, rounds: int = 3) -> dict[str, dict[str, float]]:
    """Rows per arm: prefill_ms, decode_tok_s, weight_mib, peak_rss_mib, perplexity."""
    prompt, eval_ids = _inputs(baseline, tokenizer, prompt_tokens)
    arms = {"baseline": (baseline, type(baseline).generate.__get__(baseline)), "optimized": (optimized, optimized.generate)}
    fns = {}
    for name, (model, generate) in arms.items():
        fns[f"{name}/prefill"] = lambda m=model: m(input_ids=prompt, use_cache=False)
        fns[f"{name}/generate"] = lambda g=generate: g(input_ids=prompt, max_new_tokens=new_tokens,
                                                         min_new_tokens=new_tokens, do_sample=False)
    with torch.inference_mode():
        times: dict[str, list[float]] = {name: [] for name in fns}
        for r in track(range(rounds), "optpass bench (round 1 warms up and compiles)", total=rounds):
            for name, values in interleaved_times(fns, rounds=1, warmup=1 if r == 0 else 0).items():
                times[name] += values
        rows: dict[str, dict[str, float]] = {}
        for name, (model, _) in arms.items():
            prefill = statistics.median(times[f"{name}/prefill"])
            gen = statistics.median(times[f"{name}/generate"])
            rows[name] = {
                "prefill_ms": 1e3 * prefill,
                "decode_tok_s": (new_tokens - 1) / max(gen - prefill, 1e-9),
                "weight_mib": weight_bytes(model) / 2**20,
                "peak_rss_mib": peak_rss_during(fns[f"{name}/generate"]) / 2**20,
                "perplexity": perplexity(model(input_ids=eval_ids, use_cache=False).logits, eval_ids),
            }
    return rows


def format_table(rows: dict[str, dict[str, float]]) -> str:
    cols = [("prefill_ms", "prefill ms", "{:.1f}"), ("decode_tok_s", "decode tok/s", "{:.1f}"),
            ("weight_mib", "weights MiB", "{:.1f}"), ("peak_rss_mib", "peak +RSS MiB", "{:.1f}"),
            ("perplexity", "perplexity", "{:.3f}")]
    header = ["arm"] + [c[1] for c in cols]
    body = [[arm] + [fmt.format(r[key]) for key, _, fmt in cols] for arm, r in rows.items()]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in [header, *body])
