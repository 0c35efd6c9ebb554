"""Do the GGUF and compressed-tensors exports of optimized SmolLM2 compute what optpass computes, and how fast
does llama.cpp decode optpass's GGUF next to the shipped one (llama.cpp's own Q4_1 of the same weights)?

Per scheme (int4 g32 blocks + int8 head; int8 blocks + int8 head):
- references: optpass's logits fed one token at a time (the numerics generation sees) and on a prefill, on
  `--windows` corpus windows of `--tokens` tokens past optimize()'s verify / calibration slices;
- GGUF in llama.cpp (llama-cpp-python, logits_all): top-1 agreement / KL vs both references, perplexity next
  to optpass's, greedy `--greedy` tokens from the benchmark prompt (the corpus' first 64 tokens) free-running
  and teacher-forced on optpass's continuation; the GGUF read back by optpass's own GGUF loader (fp32); the
  shipped GGUF likewise (llama.cpp's numerics on nearly the same weights: what is llama.cpp, what is the export);
- compressed-tensors directory in stock transformers (a subprocess that never imports optpass): the same
  agreement figures and perplexity, which int4 encoding the quality budget chose and both candidates' scores;
  the W4A16 (integer zero point) weights' agreement, computed in optpass's fp32 twin (transformers cannot
  load an asymmetric pack-quantized checkpoint, see optpass/export/compressed_tensors.py); for int4, the
  "float-zero" encoding too (optpass's int4 exactly, in transformers; vLLM does not serve it).
- the mapping alone: the fp32 model as an F32 GGUF in llama.cpp with an F32 KV cache vs transformers;
- timing (skip with --no-timing): llama.cpp decode tok/s on optpass's int4 GGUF vs the shipped
  SmolLM2-135M-Instruct.Q4_1.gguf, one process, interleaved rounds (medians).

    python benchmarks/export_agreement.py --no-timing          # quality only, ~15 min on 2 cores
    python benchmarks/export_agreement.py --timing-only        # timing into the existing JSON
Writes benchmarks/results/export_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import RESULTS, machine_info  # noqa: E402
from tests.export_helpers import TRANSFORMERS_LOGITS  # noqa: E402

OUT = RESULTS / "export_smollm2.json"
def nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood of `logits` [S, V] on `ids` [S]."""
    return float(torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:]))


def compare(name: str, logits: list[torch.Tensor], refs: dict[str, list[torch.Tensor]], windows: torch.Tensor) -> dict:
    """Top-1 agreement and KL of `logits` (one [S, V] per window) vs each reference, and their perplexity."""
    from optpass.metrics import logits_kl, top1_agreement

    out: dict[str, Any] = {"perplexity": float(np.exp(np.mean([nll(lg, w) for lg, w in zip(logits, windows)])))}
    for ref_name, ref in refs.items():
        out[f"top1_vs_{ref_name}"] = float(np.mean([top1_agreement(r, lg) for r, lg in zip(ref, logits)]))
        out[f"kl_vs_{ref_name}"] = float(np.mean([logits_kl(r, lg) for r, lg in zip(ref, logits)]))
    print(f"  {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in out.items()), flush=True)
    return out


def llama(path: Path, n_ctx: int, threads: int, logits_all: bool = True, f32_kv: bool = False) -> Any:
    import llama_cpp

    kv = {"type_k": 0, "type_v": 0} if f32_kv else {}  # GGML_TYPE_F32 (default: an F16 KV cache)
    return llama_cpp.Llama(model_path=str(path), logits_all=logits_all, n_ctx=n_ctx, n_batch=512, n_threads=threads,
                           n_threads_batch=threads, verbose=False, **kv)


def architecture_check(model: Any, tokenizer: Any, windows: torch.Tensor, threads: int, tmp: Path) -> dict[str, Any]:
    """The fp32 model written with F32 matrices, run by llama.cpp with an F32 KV cache, vs transformers: what is
    left is the mapping (names, q / k order, metadata), not llama.cpp's quantized arithmetic."""
    import optpass

    path = optpass.save(model, tmp / "smollm2-f32.gguf", format="gguf", tokenizer=tokenizer, float_matrices="F32")
    llm = llama(path, windows.shape[1] + 8, threads, f32_kv=True)
    ours, theirs = [], []
    with torch.no_grad():
        for w in windows:
            ours.append(model(input_ids=w[None]).logits[0])
            theirs.append(llama_logits(llm, w.tolist()))
    out = compare("fp32 model as F32 GGUF, F32 KV (llama.cpp vs transformers)", theirs, {"transformers": ours}, windows)
    out["max_abs_logit_diff"] = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
    return out


def llama_logits(llm: Any, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def llama_greedy(llm: Any, prompt: list[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        out.append(int(token))
        if len(out) == n:
            break
    return out


def greedy_record(llm: Any, prompt: list[int], ours: list[int]) -> dict[str, Any]:
    """Free-running greedy tokens vs optpass's, and teacher-forced (fed optpass's continuation) agreement."""
    theirs = llama_greedy(llm, prompt, len(ours))
    forced = llama_logits(llm, prompt + ours[:-1])[len(prompt) - 1:].argmax(-1).tolist()
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
    return {"free_running_match": sum(a == b for a, b in zip(ours, theirs)), "first_divergence": first,
            "teacher_forced_match": sum(a == b for a, b in zip(ours, forced)), "of": len(ours)}


def gguf_section(tokenizer: Any, path: Path, refs: dict, windows: torch.Tensor, prompt: list[int],
                 ours: list[int], threads: int, exported: bool = True) -> dict[str, Any]:
    from optpass.export.gguf import read_state

    llm = llama(path, n_ctx=max(windows.shape[1], len(prompt) + len(ours)) + 8, threads=threads)
    out = compare(path.name, [llama_logits(llm, w.tolist()) for w in windows], refs, windows)
    out["greedy"] = greedy_record(llm, prompt, ours)
    out["tokenization_equal"] = llm.tokenize(tokenizer.decode(windows[0]).encode(), add_bos=False) == \
        tokenizer(tokenizer.decode(windows[0]), add_special_tokens=False).input_ids
    if exported:
        from optpass.sources import load_model_source

        state = read_state(path)["export"]
        out.update(bytes=path.stat().st_size, tensor_types=state["tensor_types"], weight_error=state["weight_error"])
        back = load_model_source(str(path))[0]  # optpass's own GGUF reader (transformers dequantizes, un-permutes)
        with torch.no_grad():
            logits = [back(input_ids=w[None]).logits[0] for w in windows]
        out["read_back_by_optpass"] = compare("GGUF read back by optpass, fp32", logits, refs, windows)
    print(f"  greedy: {out['greedy']}", flush=True)
    return out


def transformers_agreement(directory: Path, refs: dict, windows: torch.Tensor, tmp: Path) -> dict:
    """Stock transformers (a subprocess without optpass) on an exported directory: agreement with each reference."""
    torch.save(windows, tmp / "ids.pt")
    run = subprocess.run([sys.executable, "-c", TRANSFORMERS_LOGITS, str(directory), str(tmp / "ids.pt"),
                          str(tmp / "ct_logits.pt")], capture_output=True, text=True, timeout=1800)
    if run.returncode:
        raise RuntimeError(f"transformers could not run the export: {run.stderr[-2000:]}")
    return compare(f"transformers ({directory.name})", list(torch.load(tmp / "ct_logits.pt")), refs, windows)


def ct_section(model: Any, tokenizer: Any, directory: Path, refs: dict, windows: torch.Tensor, tmp: Path) -> dict:
    import optpass
    from optpass.export.candidates import float_twin
    from optpass.export.ct_layers import engine_layer

    start = time.perf_counter()
    optpass.save(model, directory, format="compressed-tensors", tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    out = transformers_agreement(directory, refs, windows, tmp)
    state = json.loads((directory / "optpass_state.json").read_text())["export"]
    out.update(export_seconds=seconds, int4=state["int4"], weight_error=state["weight_error"],
               vllm_schemes=state["vllm_schemes"], bytes=sum(f.stat().st_size for f in directory.iterdir()))
    if state["int4"]:
        twin = float_twin(model, lambda lw: engine_layer(lw, "w4a16").dequantized())
        with torch.no_grad():
            logits = [twin(input_ids=w[None]).logits[0] for w in windows]
        out["w4a16_fp32_twin"] = compare("W4A16 integer zero (fp32 twin)", logits, refs, windows)
        exact = directory.with_name(directory.name + "-float-zero")  # optpass's int4 as it is (not a vLLM scheme)
        optpass.save(model, exact, format="compressed-tensors", tokenizer=tokenizer, int4="float-zero")
        fz_state = json.loads((exact / "optpass_state.json").read_text())["export"]
        out["float_zero"] = {**transformers_agreement(exact, refs, windows, tmp),
                             "weight_error": fz_state["weight_error"], "vllm_schemes": fz_state["vllm_schemes"],
                             "bytes": sum(f.stat().st_size for f in exact.iterdir())}
    return out


def quality(args: argparse.Namespace) -> dict[str, Any]:
    import optpass
    from optpass.corpus import token_windows
    from optpass.export.candidates import float_twin
    from optpass.metrics import top1_agreement
    from optpass.models import load_smollm2, smollm2_gguf_path
    from optpass.passes.quantize import QuantizeConfig
    from optpass.quality import stepwise_logits

    model, tokenizer = load_smollm2()
    windows = token_windows(tokenizer, args.tokens, args.windows, offset_windows=32)
    prompt = token_windows(tokenizer, 64, 1)[0].tolist()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out["architecture_check_fp32"] = architecture_check(model, tokenizer, windows, args.threads, Path(tmp))
    for scheme in args.schemes.split(","):
        print(f"{scheme}:", flush=True)
        optimized = optpass.optimize(model, passes=[QuantizeConfig(weights=scheme, lm_head="int8", fast_decode=False)])
        with torch.no_grad():
            refs = {"optpass_stepwise": [stepwise_logits(optimized, w[None]) for w in windows],
                    "optpass_prefill": [optimized(input_ids=w[None]).logits[0].float() for w in windows]}
            twin = float_twin(optimized, lambda lw: lw.dequantized())
            refs["optpass_fp32_twin"] = [twin(input_ids=w[None]).logits[0] for w in windows]
            del twin
            ours = type(optimized).generate(optimized, input_ids=torch.tensor([prompt]), max_new_tokens=args.greedy,
                                            min_new_tokens=args.greedy, do_sample=False)[0, len(prompt):].tolist()
        floor = {f"{a}_vs_{b}": float(np.mean([top1_agreement(x, y) for x, y in zip(refs[a], refs[b])]))
                 for a, b in (("optpass_fp32_twin", "optpass_stepwise"), ("optpass_prefill", "optpass_stepwise"))}
        print(f"  top-1 among optpass's own references (the floor): {floor}", flush=True)
        row: dict[str, Any] = {"report_quality": optimized.optpass_report.quality_final, "reference_top1": floor,
                               "optpass_perplexity": {k: float(np.exp(np.mean([nll(r, w) for r, w in zip(v, windows)])))
                                                      for k, v in refs.items()}}
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            start = time.perf_counter()
            path = optpass.save(optimized, tmp / f"smollm2-{scheme}.gguf", format="gguf", tokenizer=tokenizer)
            row["gguf"] = {"export_seconds": time.perf_counter() - start,
                           **gguf_section(tokenizer, path, refs, windows, prompt, ours, args.threads)}
            if scheme == "int4":
                out["shipped_q4_1_gguf"] = gguf_section(tokenizer, smollm2_gguf_path(), refs, windows, prompt, ours,
                                                        args.threads, exported=False)
            row["compressed_tensors"] = ct_section(optimized, tokenizer, tmp / f"smollm2-{scheme}-ct", refs, windows, tmp)
        for fmt in ("gguf", "compressed_tensors"):
            ppl = row[fmt]["perplexity"]
            row[fmt]["ppl_vs_optpass_stepwise"] = ppl / row["optpass_perplexity"]["optpass_stepwise"] - 1
        out[scheme] = row
    return out


def timing(args: argparse.Namespace) -> dict[str, Any]:
    """llama.cpp decode tok/s, optpass's int4 GGUF vs the shipped Q4_1 GGUF, interleaved rounds."""
    import optpass
    from optpass.corpus import token_windows
    from optpass.measure import interleaved_rounds
    from optpass.models import load_smollm2, smollm2_gguf_path
    from optpass.passes.quantize import QuantizeConfig

    model, tokenizer = load_smollm2()
    prompt = token_windows(tokenizer, 64, 1)[0].tolist()
    optimized = optpass.optimize(model, passes=[QuantizeConfig(weights="int4", lm_head="int8", fast_decode=False)])
    with tempfile.TemporaryDirectory() as tmp:
        path = optpass.save(optimized, Path(tmp) / "smollm2-int4.gguf", format="gguf", tokenizer=tokenizer)
        models = {"optpass int4 GGUF": llama(path, 512, args.threads, logits_all=False),
                  "shipped Q4_1 GGUF": llama(smollm2_gguf_path(), 512, args.threads, logits_all=False)}

        def decode(llm: Any) -> dict[str, float]:
            stamps = []
            for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
                stamps.append(time.perf_counter())
                if len(stamps) == args.decode_tokens + 1:
                    break
            return {"tok_s": args.decode_tokens / (stamps[-1] - stamps[0])}  # after the prefill's first token

        samples = interleaved_rounds({k: (lambda m=m: decode(m)) for k, m in models.items()}, rounds=args.rounds)
    return {"decode_tokens": args.decode_tokens, "rounds": args.rounds, "threads": args.threads,
            "median_tok_s": {k: statistics.median(v["tok_s"]) for k, v in samples.items()},
            "samples": {k: v["tok_s"] for k, v in samples.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schemes", default="int4,int8", help="block schemes, comma-separated (head int8)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--greedy", type=int, default=128, help="greedy tokens compared from the benchmark prompt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--no-timing", action="store_true", help="quality figures only")
    ap.add_argument("--timing-only", action="store_true", help="timing only, merged into the existing JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = json.loads(OUT.read_text()) if args.timing_only and OUT.exists() else {}
    result.update(machine=machine_info(), command="python benchmarks/export_agreement.py " + " ".join(sys.argv[1:]))
    if not args.timing_only:
        result.update(windows=args.windows, tokens=args.tokens, greedy_tokens=args.greedy, quality=quality(args))
    result["timing"] = None if args.no_timing else timing(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
