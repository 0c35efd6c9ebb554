"""Does a busy machine change what `optpass optimize smollm2 --target cpu` chooses?

Runs the main job as a user would (the CLI, in subprocesses) on a quiet machine and with one core held by a
busy loop (a second process spinning for the whole run, the common case on a laptop or shared server), in two
set-ups:
  uncalibrated  no calibration cached (a fresh machine): the plan comes from the uncalibrated spec;
  calibrated    `optpass calibrate --target cpu --force` first, then optimize: on the busy machine the
                calibration must refuse (nothing cached, exit 1) or land within 25% of the quiet figures.
The chosen candidates (pass + label) of each busy run are compared with the quiet run of the same set-up; the
busy reports' latency notes are kept, since they must say the timing cannot be trusted.
The cached calibration is moved aside during the run and put back afterwards.

    python benchmarks/busy_plan.py
Writes benchmarks/results/busy_plan.json.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import RESULTS, machine_info  # noqa: E402

OPTPASS = str(Path(sys.executable).with_name("optpass"))
BUSY_LOOP = "while True: pass"


def run(args: list[str]) -> dict[str, Any]:
    start = time.perf_counter()
    done = subprocess.run([OPTPASS, *args], capture_output=True, text=True, timeout=3600)
    return {"command": "optpass " + " ".join(args), "exit": done.returncode, "seconds": time.perf_counter() - start,
            "stderr_tail": done.stderr.strip().splitlines()[-3:]}


def optimize(report: Path) -> dict[str, Any]:
    out = run(["optimize", "smollm2", "--target", "cpu", "--report-json", str(report)])
    data = json.loads(report.read_text())
    out["chosen"] = sorted(f"{c['pass_name']}: {c['label']}" for c in data["candidates"] if c["chosen"])
    out["latency_notes"] = (data.get("latency") or {}).get("notes", [])
    out["calibration_note"] = next((n for n in data.get("notes", []) if n.startswith("target cpu")), None)
    return out


def calibration_figures() -> dict[str, float] | None:
    from optpass.cost_models import calibrate as cal

    record, _ = cal.load_with_reason()
    if record is None:
        return None
    return {"triad_GBps": record["triad"]["bytes_per_s"] / 1e9,
            **{f"{s}_weight_GBps": v["bw"] / 1e9 for s, v in record["linear"].items()}}


def scenario(calibrate: bool, busy: bool, tmp: Path) -> dict[str, Any]:
    spinner = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    try:
        time.sleep(1.0 if busy else 0.0)
        out: dict[str, Any] = {}
        if calibrate:
            out["calibrate"] = run(["calibrate", "--target", "cpu", "--force"])
            out["calibration"] = calibration_figures()
        out["optimize"] = optimize(tmp / f"report-{calibrate}-{busy}.json")
        return out
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()


def main() -> None:
    from optpass.cost_models import calibrate as cal

    cached = cal.cache_path().parent
    aside = cached.with_name(cached.name + ".busy_plan_aside")
    if cached.exists():
        shutil.move(str(cached), str(aside))
    result: dict[str, Any] = {"machine": machine_info(), "command": "python benchmarks/busy_plan.py", "runs": {}}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for setup, calibrate in (("uncalibrated", False), ("calibrated", True)):
                for busy in (False, True):
                    name = f"{setup}/{'busy' if busy else 'quiet'}"
                    print(f"{name} ...", flush=True)
                    result["runs"][name] = scenario(calibrate, busy, Path(tmp))
                    print(json.dumps(result["runs"][name], indent=1), flush=True)
                quiet, busy_run = (result["runs"][f"{setup}/{k}"]["optimize"]["chosen"] for k in ("quiet", "busy"))
                result[f"{setup}_same_plan"] = quiet == busy_run
    finally:
        if cached.exists():
            shutil.rmtree(cached)
        if aside.exists():
            shutil.move(str(aside), str(cached))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "busy_plan.json").write_text(json.dumps(result, indent=2, default=str))
    print({k: v for k, v in result.items() if k.endswith("same_plan")})


if __name__ == "__main__":
    main()
