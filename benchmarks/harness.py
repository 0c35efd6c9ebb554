"""Benchmark harness: baseline and optpass variants in one process, interleaved rounds, medians.

A scenario is a list of `Variant`s. Each variant builds its state once (`setup`), then every round
runs every variant's `measure` in turn, starting one variant later each round (so machine drift and
neighbour effects hit all alike): `optpass.measure.interleaved_rounds`, the protocol the report's own timing
uses; `quality` runs once.
Results go to `benchmarks/results/<scenario>.json` and `.md` with the machine and the command.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from optpass.measure import interleaved_rounds

RESULTS = Path(__file__).parent / "results"


@dataclass
class Variant:
    name: str
    setup: Callable[[], Any]
    measure: Callable[[Any], dict[str, float]]  # one timed repetition -> metrics (e.g. tok/s)
    quality: Callable[[Any], dict[str, Any]] | None = None  # measured once, untimed
    note: str = ""
    state: Any = None
    samples: dict[str, list[float]] = field(default_factory=dict)
    error: str = ""


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def run_scenario(name: str, variants: list[Variant], rounds: int = 5, warmup: int = 1,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Set up every variant, run `rounds` interleaved rounds, and write the results."""
    live = []
    for v in variants:
        t0 = time.perf_counter()
        try:
            v.state = v.setup()
            for _ in range(warmup):
                v.measure(v.state)
            live.append(v)
        except Exception as e:  # noqa: BLE001 - a peer that does not run here is reported, not fatal
            v.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        print(f"[bench] setup {v.name}: {'ok' if not v.error else v.error} ({time.perf_counter() - t0:.1f}s)",
              file=sys.stderr, flush=True)
    samples = interleaved_rounds({v.name: (lambda v=v: v.measure(v.state)) for v in live}, rounds, warmup=0,
                                 on_round=lambda r: print(f"[bench] round {r + 1}/{rounds} done", file=sys.stderr,
                                                          flush=True))
    for v in live:
        v.samples = samples[v.name]
    rows = []
    for v in variants:
        row: dict[str, Any] = {"variant": v.name, "note": v.note}
        if v.error:
            row["error"] = v.error
        for key, values in v.samples.items():
            row[key] = {"median": statistics.median(values), "min": min(values), "max": max(values), "samples": values}
        if v.quality and not v.error:
            row.update(v.quality(v.state))
        rows.append(row)
    result = {"scenario": name, "command": " ".join([Path(sys.executable).name, *sys.argv]), "rounds": rounds,
              "machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows, **(extra or {})}
    write(name, result)
    return result


def write(name: str, result: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    (RESULTS / f"{name}.md").write_text(markdown(result))
    print(markdown(result))


def _fmt(value: Any) -> str:
    if isinstance(value, dict) and "median" in value:
        return f"{value['median']:.4g} ({value['min']:.4g}-{value['max']:.4g})"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown(result: dict[str, Any]) -> str:
    keys: list[str] = []
    for row in result["rows"]:
        keys += [k for k in row if k not in keys and k not in ("variant", "note")]
    m = result["machine"]
    lines = [f"# {result['scenario']}", "",
             f"`{result['command']}` | {result['date']} | {m['cpu']}, {m['threads']} threads, torch {m['torch']}"
             f" | {result['rounds']} interleaved rounds, median (min-max)", "",
             "| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in result["rows"]:
        lines.append(f"| {row['variant']} | " + " | ".join(_fmt(row.get(k, "")) for k in keys) + " |")
    notes = [f"- {row['variant']}: {row['note']}" for row in result["rows"] if row.get("note")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"
