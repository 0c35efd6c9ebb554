"""One prefill's attention call on CPU: optpass's bf16 flash kernel (`optpass::prefill_attention`) against PyTorch's
fp32 SDPA (what an fp32 model runs), SDPA on bf16 tensors (what a user casting to bf16 gets) and FlexAttention with
a causal block mask compiled as its documentation recommends, at the head shapes of SmolLM2-135M (9 query / 3 KV
heads x 64) and Gemma-3 270M (4 / 1 x 256), causal, batch 1. Interleaved rounds, rotating order, median; the error
columns are max |out - fp32 SDPA| over the output.

    python benchmarks/prefill_attention.py [--lengths 512,2048,8192] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import RESULTS, machine_info  # noqa: E402
from optpass.measure import interleaved_times  # noqa: E402

SHAPES = {"smollm2": (9, 3, 64), "gemma3": (4, 1, 256)}


def arms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, object]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from optpass.backends.cpu import prefill_attention

    scale = q.shape[-1] ** -0.5
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, q.shape[2], q.shape[2], device="cpu")
    flex = torch.compile(flex_attention, dynamic=False)
    return {
        "sdpa fp32": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True),
        "sdpa bf16": lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True),
        "flex fp32": lambda: flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=True),
        "optpass bf16 kernel": lambda: prefill_attention.attend(q, k, v, scale).transpose(1, 2),
    }


@torch.no_grad()
def main() -> None:
    from optpass.backends.cpu import prefill_attention

    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="512,2048,8192")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if not prefill_attention.available():
        raise SystemExit("optpass::prefill_attention is not built on this machine (needs AVX-512 BF16)")
    result = {"scenario": "prefill_attention", "command": " ".join(["python", *sys.argv]), "machine": machine_info(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": torch.get_num_threads(), "runs": {}}
    for model, (heads, kv_heads, dim) in SHAPES.items():
        for seq in (int(x) for x in args.lengths.split(",")):
            g = torch.Generator().manual_seed(seq)
            q = torch.randn(1, heads, seq, dim, generator=g)
            k, v = torch.randn(1, kv_heads, seq, dim, generator=g), torch.randn(1, kv_heads, seq, dim, generator=g)
            fns = arms(q, k, v)
            reference = fns["sdpa fp32"]()
            errors = {n: float((fn().float() - reference).abs().max()) for n, fn in fns.items()}
            times = interleaved_times(fns, rounds=args.rounds, warmup=1)
            medians = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
            flops = 4.0 * heads * dim * seq * (seq + 1) / 2
            row = {n: {"ms": 1e3 * t, "gflop_s": flops / t / 1e9, "vs_sdpa_fp32": medians["sdpa fp32"] / t,
                       "max_abs_error": errors[n]} for n, t in medians.items()}
            result["runs"][f"{model} {seq}"] = row
            print(f"{model} S={seq}: " + ", ".join(f"{n} {r['ms']:.2f} ms ({r['vs_sdpa_fp32']:.2f}x, err "
                                                    f"{r['max_abs_error']:.1e})" for n, r in row.items()), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "prefill_attention.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
