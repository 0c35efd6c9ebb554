"""Quality of SmolLM2 quantization variants on real weights: perplexity on pydoc_data.topics (512-token windows,
disjoint from the calibration slice) and KL to the fp32 logits, for int8 and int4 at group sizes 32 / 64 / 128,
with and without activation-aware scaling (AWQ), LM head int8 or int4. Eager forwards: no timing here.

    python benchmarks/quant_quality.py [--windows 16]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import machine_info, write  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("OPTPASS_PROGRESS", "0")
    torch.set_num_threads(2)
    import optpass
    from optpass.corpus import token_windows
    from optpass.models import load_smollm2
    from optpass.passes.quantize import QuantizeConfig

    model, tok = load_smollm2()
    # evaluation windows start after the 8 + 4 windows optimize() uses to verify and calibrate
    windows = token_windows(tok, 512, args.windows, offset_windows=16)

    @torch.inference_mode()
    def score(m: torch.nn.Module, ref: list[torch.Tensor] | None) -> tuple[float, float, list[torch.Tensor]]:
        nll = kl = 0.0
        n = 0
        outs = []
        for i, w in enumerate(windows):
            logp = torch.log_softmax(m(input_ids=w[None]).logits.float()[0, :-1], -1)
            outs.append(logp)
            nll += float(-logp.gather(-1, w[1:, None]).sum())
            if ref is not None:
                kl += float(torch.nn.functional.kl_div(logp, ref[i], log_target=True, reduction="sum"))
            n += w.numel() - 1
        return math.exp(nll / n), kl / n, outs

    base_ppl, _, reference = score(model, None)
    rows = [{"variant": "fp32", "perplexity": base_ppl, "ppl_increase": 0.0, "kl_vs_fp32": 0.0}]
    configs = [("int8, head int8", QuantizeConfig(weights="int8", lm_head="int8"))]
    for gs in (32, 64, 128):
        for awq in (False, True):
            configs.append((f"int4 g{gs}{' +AWQ' if awq else ''}, head int8",
                            QuantizeConfig(weights="int4", group_size=gs, awq=awq, lm_head="int8")))
    configs.append(("int4 g32, head int4", QuantizeConfig(weights="int4", group_size=32, lm_head="int4")))
    configs.append(("int4 g128 +AWQ, head int4", QuantizeConfig(weights="int4", group_size=128, awq=True, lm_head="int4")))
    for label, cfg in configs:
        t = time.perf_counter()
        cfg = dataclasses.replace(cfg, fast_decode=False)  # eager forwards only
        out = optpass.optimize(copy.deepcopy(model), passes=[cfg], quality_budget="ppl:100%")
        record = out.optpass_report.passes[0]
        ppl, kl, _ = score(out, reference)
        rows.append({"variant": label, "perplexity": ppl, "ppl_increase": ppl / base_ppl - 1, "kl_vs_fp32": kl,
                     "status": record.status, "sites_quantized": len(record.sites), "seconds": round(time.perf_counter() - t, 1),
                     "awq_mean_alpha": next((round(v["mean_alpha"], 3) for k, v in record.details.items()
                                             if k.startswith("awq")), "-")})
        print(rows[-1], file=sys.stderr, flush=True)
    write("quant_quality_smollm2", {"scenario": "quant_quality_smollm2", "command": " ".join(["python", *sys.argv]),
                                    "rounds": 1, "machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                    "scored_tokens": args.windows * 511, "rows": rows})


if __name__ == "__main__":
    main()
