"""Dynamic layer skipping on SmolLM2-135M (fp32): quality vs compute for SkipDecode-style schedules (full depth up to
`warmup`, then one more block skipped every `every` positions, least influential first), next to static removal
of as many blocks in the same run, and the choice `optimize(passes=["dynamic_skip"])` makes under the default
budget.

Compute = the share of block evaluations a 512-token window runs (1.0 = every block for every token). Quality:
perplexity, KL and top-1 agreement to the full model on windows disjoint from the calibration ones, every
position scored (the schedule changes the tokens past `warmup`; the earlier ones are the full model's).

    python benchmarks/dynamic_skip.py [--max 8] [--windows 16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import RESULTS, machine_info  # noqa: E402
from benchmarks.layer_removal import quality  # noqa: E402

SCHEDULES = ((64, 16), (128, 32))  # (warmup, every)
WINDOW = 512


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max", type=int, default=8)
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args()
    import optpass
    from optpass.backends.skip_schedule import compute_fraction, install_schedule, ramp
    from optpass.corpus import token_windows
    from optpass.models import load_smollm2
    from optpass.passes.layer_skip import block_influence, decoder_layers, remove_blocks

    model, tok = load_smollm2()
    model.eval()
    calib = token_windows(tok, 256, 4)
    evaluation = token_windows(tok, WINDOW, args.windows, offset_windows=4)
    influence = block_influence(model, [{"input_ids": w[None]} for w in calib])
    layers = decoder_layers(model)
    ranked = sorted(range(1, len(layers) - 1), key=lambda i: influence[i])
    with torch.no_grad():
        ref = [model(input_ids=w).logits.float() for w in evaluation.split(1)]
    base = quality(model, evaluation, ref)
    rows = [{"kind": "full", "blocks": 0, "compute": 1.0, **base}]
    print(f"full: ppl {base['perplexity']:.3f}", flush=True)
    for warmup, every in SCHEDULES:
        for n in range(1, args.max + 1):
            thresholds = ramp(ranked[:n], warmup, every)
            undo = install_schedule(layers, thresholds)
            q = quality(model, evaluation, ref)
            undo()
            share = compute_fraction(thresholds, len(layers), WINDOW)
            rows.append({"kind": f"dynamic warmup {warmup} every {every}", "blocks": n, "compute": share, **q})
            print(f"dynamic w{warmup}/e{every} n={n}: compute {share:.3f} ppl {q['perplexity']:.3f} "
                  f"({q['perplexity'] / base['perplexity'] - 1:+.1%}) top1 {q['top1_vs_full']:.3f}", flush=True)
    for n in range(1, 5):
        undo = remove_blocks(model, sorted(ranked[:n]))
        q = quality(model, evaluation, ref)
        undo()
        rows.append({"kind": "static removal", "blocks": n, "compute": 1 - n / len(layers), **q})
        print(f"static n={n}: compute {1 - n / len(layers):.3f} ppl {q['perplexity']:.3f}", flush=True)
    out = optpass.optimize(model, passes=["dynamic_skip"])
    record = next(r for r in out.optpass_report.passes if r.name == "dynamic_skip")
    choice = {"status": record.status, "reason": record.reason, "schedule": record.details.get("schedule"),
              "tried": record.details.get("tried")}
    print("optimize(passes=['dynamic_skip']) under the default budget:", record.status,
          record.reason or record.details.get("schedule"))
    lines = ["# Dynamic layer skipping, SmolLM2-135M fp32 (blocks in ShortGPT block-influence order)", "",
             f"Machine: {machine_info()['cpu']}. Command: `python benchmarks/dynamic_skip.py --max {args.max} "
             f"--windows {args.windows}` ({args.windows} x {WINDOW}-token windows of pydoc_data.topics, every "
             "position scored).", "",
             "| schedule | blocks | compute share | perplexity | change | KL vs full | top-1 vs full |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['blocks']} | {r['compute']:.3f} | {r['perplexity']:.3f} | "
              f"{r['perplexity'] / base['perplexity'] - 1:+.1%} | {r['kl_vs_full']:.4f} | {r['top1_vs_full']:.3f} |"
              for r in rows]
    lines += ["", f"Default budget: {choice['status']} ({choice['reason'] or choice['schedule']})"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dynamic_skip_smollm2.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "dynamic_skip_smollm2.json").write_text(json.dumps(
        {"machine": machine_info(), "influence": influence, "rows": rows, "default_budget": choice}, indent=1))


if __name__ == "__main__":
    main()
