"""Does the ONNX export of int4 SmolLM2 (int4 g32 blocks, int8 head, MatMulNBits) compute what the PyTorch
model computes? Top-1 agreement on corpus windows, four ways: ORT vs PyTorch with both fed one token per step
through the KV cache (the numerics generation sees), ORT vs PyTorch on a whole-window prefill, and each runtime
against itself (prefill vs steps). PyTorch's int4 kernels depend on the row count (tinygemm / int8pack with
bf16 activations for a decode step, bf16 dequantize + GEMM for a 128-row prefill), ORT's do not.

    python benchmarks/onnx_agreement.py [--windows 8] [--tokens 128]     # ~3 min export + ~1 min
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import RESULTS, machine_info  # noqa: E402


def main() -> None:
    import optpass
    from optpass.backends.onnx.export import export_onnx
    from optpass.backends.onnx.runtime import OrtCausalLM
    from optpass.corpus import token_windows
    from optpass.models import load_smollm2
    from optpass.passes.quantize import QuantizeConfig
    from optpass.quality import stepwise_logits, top1_agreement

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    model, tok = load_smollm2()
    quantized = optpass.optimize(model, passes=[QuantizeConfig(weights="int4", lm_head="int8", fast_decode=False)])
    rows = {"ORT vs PyTorch, both stepwise (generation)": [], "ORT vs PyTorch, both prefill": [],
            "PyTorch prefill vs PyTorch stepwise": [], "ORT prefill vs ORT stepwise": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "smollm2_int4.onnx"
        export_onnx(quantized, path)
        lm = OrtCausalLM(path)
        for ids in token_windows(tok, args.tokens, args.windows):
            ids = ids[None]
            pt_step, ort_step = stepwise_logits(quantized, ids), lm.stepwise_logits(ids)
            with torch.no_grad():
                pt_pre = quantized(input_ids=ids).logits[0].float()
            ort_pre = lm.logits(ids)[0]
            for key, (a, b) in zip(rows, ((pt_step, ort_step), (pt_pre, ort_pre), (pt_pre, pt_step), (ort_pre, ort_step))):
                rows[key].append(top1_agreement(a, b))
    result = {"machine": machine_info(), "windows": args.windows, "tokens": args.tokens,
              "top1": {k: float(np.mean(v)) for k, v in rows.items()}, "per_window": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "onnx_agreement.json").write_text(json.dumps(result, indent=2))
    lines = ["# onnx_agreement", "", f"`python benchmarks/onnx_agreement.py --windows {args.windows} --tokens {args.tokens}`"
             f" | {result['machine']['cpu']}, torch {result['machine']['torch']}", "",
             f"| comparison (int4 g32 blocks + int8 head, {args.windows} x {args.tokens} tokens) | top-1 agreement |",
             "|---|---|", *[f"| {k} | {v:.2%} |" for k, v in result["top1"].items()]]
    (RESULTS / "onnx_agreement.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
