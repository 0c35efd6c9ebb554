"""`optpass calibrate --target cpu`: measure this machine (about a minute) and cache it for `get_spec("cpu")`.
On a busy machine, or when the figures are implausible, it refuses (exit code 1, the reason printed) and caches
nothing; `--show` prints what is cached and whether it is used."""

from __future__ import annotations

import argparse

from optpass.cli import command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="cpu", help="only 'cpu': named GPU specs are datasheet figures")
    p.add_argument("--threads", type=int, default=None, help="torch threads (part of the cache key)")
    p.add_argument("--quick", action="store_true", help="seconds-long calibration on small shapes (tests, smoke runs)")
    p.add_argument("--force", action="store_true", help="re-measure even if a calibration for this fingerprint is cached")
    p.add_argument("--show", action="store_true", help="print the cached calibration (when and how it was taken) and "
                   "whether it is used, without measuring")


def summary(record: dict) -> str:
    """A few lines: when and how it was taken, bandwidth, floors, per-scheme linear figures with their spread."""
    conditions = record.get("conditions", {})
    efficiency = conditions.get("parallel_efficiency", {})
    lines = [f"taken {record.get('taken_at', 'at an unrecorded time')} in {record.get('seconds', 0):.0f} s"
             + (" (quick)" if record.get("quick") else "")
             + (f"; load average {conditions['loadavg_before'][0]:.2f} before, {conditions['loadavg_after'][0]:.2f} "
                f"after" if "loadavg_after" in conditions else "")
             + (f"; parallel efficiency {min(efficiency.values()):.2f}-{max(efficiency.values()):.2f}"
                if efficiency else ""),
             f"triad bandwidth {record['triad']['bytes_per_s'] / 1e9:.1f} GB/s (spread {record['triad']['spread']:.0%})",
             f"dispatch floor {record['floors']['glue']['median'] * 1e6:.1f} us/op (glue chain; cheapest op "
             f"{record['floors']['op']['median'] * 1e6:.1f} us), module call {record['floors']['module']['median'] * 1e6:.1f} us, "
             f"decode SDPA {record['floors']['sdpa']['median'] * 1e6:.1f} us",
             "linear " + "x".join(map(str, record["shape"])) + ": scheme | overhead us | weight GB/s | GFLOP/s at M="
             + ",".join(str(m) for m in next(iter(record["linear"].values()))["rates"])]
    for scheme, v in record["linear"].items():
        rates = ", ".join(f"{r / 1e9:.0f} (±{v['spread'][m] / 2:.0%})" for m, r in v["rates"].items())
        lines.append(f"  {scheme:9s} | {v['overhead'] * 1e6:6.1f} | {v['bw'] / 1e9:5.1f} | {rates}")
    lines.append("sdpa causal GFLOP/s: " + ", ".join(f"S={s}: {v['flops_per_s'] / 1e9:.0f}" for s, v in record["sdpa"].items()))
    if "block_sparse" in record:
        lines.append("block-sparse lowering, dense causal layout, GFLOP/s: " + ", ".join(
            f"S={s}: {v['flops_per_s'] / 1e9:.0f}" for s, v in record["block_sparse"].items()))
    return "\n".join(lines)


@command("calibrate", help="measure this machine's bandwidth, GEMM, SDPA and dispatch costs for the cost model",
         add_arguments=add_arguments)
def run(args: argparse.Namespace) -> int:
    import torch

    from optpass.cost_models import calibrate as cal
    from optpass.errors import UnknownTargetError

    if args.target != "cpu":
        raise UnknownTargetError(f"calibrate: target {args.target!r} cannot be measured here; only 'cpu' is calibrated "
                                 "(named GPU specs are datasheet figures, used for ordering only)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.show:
        record, why = cal.load_with_reason()
        if record is None:
            print(f"not used: {why}" if why else f"no calibration cached for this fingerprint ({cal.cache_path()})")
            return 0
        print(f"cached calibration at {cal.cache_path()}")
        print(summary(record))
        return 0
    record = None if args.force else cal.load()
    if record is not None and record.get("quick") and not args.quick:
        record = None  # a quick calibration never stands in for a full one
    if record is None:
        record = cal.calibrate(quick=args.quick)
        path = cal.save(record)
        print(f"calibrated in {record['seconds']:.0f} s; cached at {path}")
    else:
        print(f"cached calibration for this fingerprint at {cal.cache_path()} (--force to re-measure)")
    print(summary(record))
    spec = cal.spec_from_record(record)
    print(f"{spec.source['calibration']}; error band {spec.error_band:.0%}")
    return 0
