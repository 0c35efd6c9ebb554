"""Static layer removal on SmolLM2-135M (fp32): perplexity and KL to the full model as 0..8 blocks are removed in
the order of ShortGPT's block influence (measured on calibration windows disjoint from the evaluation ones), and
the choice `optimize(passes=["layer_skip"])` makes under the default budget.

The same curve says what self-speculative drafting (draft with the reduced model, verify with the full one) could
gain: the reduced model's top-1 agreement with the full model, teacher-forced, is the per-token acceptance `a`
of such a drafter. With draft length k, a draft token costing (L - n) / L of a step and a verify step costing
`--verify-cost` steps, the expected speedup is (1 - a^(k+1)) / (1 - a) / (k (L - n) / L + verify_cost); the
table gives the best k's figure (an upper bound: the runtime adds the draft loop's overhead).

    python benchmarks/layer_removal.py [--max 8] [--windows 16] [--verify-cost 1.3]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import RESULTS, machine_info  # noqa: E402


@torch.no_grad()
def quality(model, windows: torch.Tensor, ref_logits: list[torch.Tensor]) -> dict[str, float]:
    from optpass.metrics import logits_kl, perplexity, top1_agreement

    nll, kls, top1 = [], [], []
    for w, ref in zip(windows.split(1), ref_logits):
        logits = model(input_ids=w).logits.float()
        nll.append(math.log(perplexity(logits, w)))  # equal-length windows: the mean NLL is the corpus NLL
        kls.append(logits_kl(ref, logits))
        top1.append(top1_agreement(ref, logits))
    return {"perplexity": math.exp(sum(nll) / len(nll)), "kl_vs_full": sum(kls) / len(kls),
            "top1_vs_full": sum(top1) / len(top1)}


def self_speculative_bound(acceptance: float, kept_share: float, verify_cost: float) -> tuple[float, int]:
    """(best expected speedup, its draft length) for a drafter with per-token acceptance `acceptance`."""
    best = (1.0, 0)
    for k in range(1, 9):
        tokens = sum(acceptance ** i for i in range(k + 1))
        best = max(best, (tokens / (k * kept_share + verify_cost), k))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max", type=int, default=8)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--verify-cost", type=float, default=1.3,
                    help="a (k+1)-token verify step in one-token steps (benchmarks/speculative.py measures it)")
    args = ap.parse_args()
    import optpass
    from optpass.corpus import token_windows
    from optpass.models import load_smollm2
    from optpass.passes.layer_skip import block_influence, decoder_layers, remove_blocks

    model, tok = load_smollm2()
    model.eval()
    calib = token_windows(tok, 256, 4)
    evaluation = token_windows(tok, 512, args.windows, offset_windows=4)
    influence = block_influence(model, [{"input_ids": w[None]} for w in calib])
    layers = decoder_layers(model)
    ranked = sorted(range(1, len(layers) - 1), key=lambda i: influence[i])
    with torch.no_grad():
        ref = [model(input_ids=w).logits.float() for w in evaluation.split(1)]
    rows = []
    for n in range(args.max + 1):
        undo = remove_blocks(model, sorted(ranked[:n]))
        q = quality(model, evaluation, ref)
        undo()
        speedup, k = self_speculative_bound(q["top1_vs_full"], (len(layers) - n) / len(layers), args.verify_cost)
        rows.append({"removed": n, "blocks": sorted(ranked[:n]), **q, "self_spec_bound": speedup, "self_spec_k": k})
        print(f"removed {n}: blocks {sorted(ranked[:n])} ppl {q['perplexity']:.3f} KL {q['kl_vs_full']:.4f} "
              f"top1 {q['top1_vs_full']:.3f} self-spec bound {speedup:.2f}x (k={k})", flush=True)
    base = rows[0]["perplexity"]
    out = optpass.optimize(model, passes=["layer_skip"])
    record = next(r for r in out.optpass_report.passes if r.name == "layer_skip")
    choice = {"status": record.status, "reason": record.reason, "removed": record.details.get("removed"),
              "tried": record.details.get("tried")}
    print("optimize(passes=['layer_skip']) under the default budget:", record.status, record.reason or
          record.details.get("removed"))
    lines = ["# Layer removal, SmolLM2-135M fp32 (ShortGPT block influence order)", "",
             f"Machine: {machine_info()['cpu']}. Command: `python benchmarks/layer_removal.py --max {args.max} "
             f"--windows {args.windows}` ({args.windows} x 512-token windows of pydoc_data.topics).", "",
             f"Self-speculative bound with a verify step of {args.verify_cost} steps.", "",
             "| removed | blocks | perplexity | change | KL vs full | top-1 vs full | self-spec bound (k) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['removed']} | {r['blocks']} | {r['perplexity']:.3f} | {r['perplexity'] / base - 1:+.1%} | "
              f"{r['kl_vs_full']:.4f} | {r['top1_vs_full']:.3f} | {r['self_spec_bound']:.2f}x ({r['self_spec_k']}) |"
              for r in rows]
    lines += ["", f"Default budget: {choice['status']} ({choice['reason'] or choice['removed']})"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "layer_removal_smollm2.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "layer_removal_smollm2.json").write_text(json.dumps(
        {"machine": machine_info(), "influence": influence, "rows": rows, "default_budget": choice}, indent=1))


if __name__ == "__main__":
    main()
