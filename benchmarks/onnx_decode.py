"""SmolLM2-135M batch-1 greedy decode (64-token prompt, 128 new tokens, KV cache) in ONNX Runtime, on graphs
exported by `export_onnx` (int4 / int8 linears as com.microsoft::MatMulNBits), next to the PyTorch optpass
int4 / int8 paths (`model.generate`, compiled static decode) and HF fp32 eager, in one process, interleaved
rounds, medians. Quality: top-1 agreement and KL to the fp32 model's logits on corpus windows, greedy-token
match with fp32. ORT MatMulNBits accuracy_level: 0 = fp32 activations (the export default; int8 layers as
two int4 nibble halves), 4 = int8 activations (int8 layers as one bits=8 node).

    python benchmarks/onnx_decode.py [--rounds 5] [--windows 4] [--only ort-int4,optpass-int4]
    python benchmarks/onnx_decode.py --quick   # tiny random Llama, 16 new tokens: checks the harness only
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.decode import HFRunner, decode_rate  # noqa: E402
from benchmarks.harness import Variant, run_scenario  # noqa: E402


class OrtRunner:
    """OrtCausalLM behind the HFRunner interface (`generate(ids, new)` with EOS suppressed, `logits(ids)`)."""

    def __init__(self, path: Path, threads: int) -> None:
        from optpass.backends.onnx.runtime import OrtCausalLM

        self.lm, self.path = OrtCausalLM(path, threads=threads), path

    def generate(self, ids: torch.Tensor, new: int) -> torch.Tensor:
        return self.lm.generate(ids, new, min_new_tokens=new)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.logits(ids)


def build(model: Any, workdir: Path, threads: int, quick: bool) -> list[tuple[str, Any, str]]:
    """(name, setup -> runner, note); ORT variants export the matching optpass model (cached per scheme)."""
    import optpass
    from optpass.backends.onnx.export import export_onnx, spec_path
    from optpass.backends.onnx.quantize_matmul import with_accuracy_level
    from optpass.passes.quantize import QuantizeConfig

    optimized: dict[str, Any] = {}
    configs = {"int8": QuantizeConfig(weights="int8", lm_head="int8"), "int4": QuantizeConfig(weights="int4", lm_head="int8")}

    def quantized(scheme: str) -> Any:
        if scheme not in optimized:
            optimized[scheme] = optpass.optimize(copy.deepcopy(model), target="cpu", passes=[configs[scheme]])
        return optimized[scheme]

    def exported(scheme: str) -> Path:
        path = workdir / f"{scheme}.onnx"
        if not path.exists():
            src = model if scheme == "fp32" else quantized(scheme)
            t = time.perf_counter()
            export_onnx(src, path)
            print(f"[bench] exported {scheme} in {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
        return path

    def ort(scheme: str, level: int | None = None) -> OrtRunner:
        path = exported(scheme)
        if level is not None:
            out = workdir / f"{scheme}-acc{level}.onnx"
            with_accuracy_level(str(path), str(out), level)
            spec_path(out).write_text(spec_path(path).read_text())
            path = out
        return OrtRunner(path, threads)

    return [
        ("hf-fp32", lambda: HFRunner(model), "HF eager fp32"),
        ("optpass-int8", lambda: HFRunner(quantized("int8")), "PyTorch: int8 blocks + head, compiled static decode"),
        ("optpass-int4", lambda: HFRunner(quantized("int4")), "PyTorch: int4 g32 blocks + int8 head, compiled static decode"),
        ("ort-fp32", lambda: ort("fp32"), "ORT: fp32 export (MatMul)"),
        ("ort-int8", lambda: ort("int8"), "ORT: int8 as two int4 nibble halves, fp32 activations (level 0)"),
        ("ort-int4", lambda: ort("int4"), "ORT: int4 g32 + int8 head, fp32 activations (level 0)"),
        ("ort-int4-acc4", lambda: ort("int4", 4), "ORT: int4 g32 + int8 head, level 4 (int8 activations)"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--windows", type=int, default=4, help="256-token corpus windows for top-1 / KL")
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, 16 new tokens, 2 rounds")
    args = parser.parse_args()
    os.environ.setdefault("OPTPASS_PROGRESS", "0")
    threads = 1 if args.quick else 2
    torch.set_num_threads(threads)
    from optpass.corpus import token_windows

    if args.quick:
        from optpass.models import tiny_llama

        model, new, plen, rounds, windows = tiny_llama(), 16, 16, 2, 1
        g = torch.Generator().manual_seed(0)
        prompt, evals = torch.randint(0, 256, (1, plen), generator=g), torch.randint(0, 256, (windows, 64), generator=g)
    else:
        from optpass.models import load_smollm2

        model, tok = load_smollm2()
        new, plen, rounds = 128, 64, args.rounds
        prompt, evals = token_windows(tok, plen, 1), token_windows(tok, 256, args.windows, offset_windows=2)
    with torch.inference_mode():
        reference = [model(input_ids=w[None]).logits.float() for w in evals]
    reference_tokens = HFRunner(model).generate(prompt, new)[0, plen:]

    def quality(runner: Any) -> dict[str, Any]:
        top1, kl = [], []
        with torch.inference_mode():
            for w, ref in zip(evals, reference):
                logits = runner.logits(w[None]).float()
                top1.append(float((logits.argmax(-1) == ref.argmax(-1)).float().mean()))
                kl.append(float(torch.nn.functional.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(ref, -1),
                                                           log_target=True, reduction="batchmean")) / w.numel())
        tokens = runner.generate(prompt, new)[0, plen:]
        match = int((tokens == reference_tokens).int().cumprod(0).sum())
        extra = {"file_mb": runner.path.stat().st_size / 1e6} if isinstance(runner, OrtRunner) else {}
        return {"top1_vs_fp32": sum(top1) / len(top1), "kl_vs_fp32": sum(kl) / len(kl), "greedy_match": f"{match}/{new}",
                "setup_s": round(runner.setup_s, 1), **extra}

    only = set(args.only.split(",")) if args.only else None
    with tempfile.TemporaryDirectory() as tmp:
        variants = []
        for name, setup, note in build(model, Path(tmp), threads, args.quick):
            if only is not None and name not in only:
                continue

            def timed_setup(setup: Any = setup) -> Any:
                t = time.perf_counter()
                runner = setup()
                runner.generate(prompt, 4)  # compile / warm up
                runner.setup_s = time.perf_counter() - t
                return runner

            variants.append(Variant(name, timed_setup, lambda r: {"decode_tok_s": decode_rate(r, prompt, new)},
                                    quality=quality, note=note))
        run_scenario("onnx_decode_quick" if args.quick else "onnx_decode_smollm2", variants, rounds=rounds,
                     extra={"new_tokens": new, "prompt_tokens": plen, "ort_threads": threads})


if __name__ == "__main__":
    main()
