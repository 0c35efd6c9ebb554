"""Batch-1 greedy decode (64-token prompt, 128 new tokens) and 512-token prefill of a built-in LLM (SmolLM2-135M or
Gemma-3 270M): optpass `auto` / int8 / int8 W8A8 / grouped int8 / int4 against HF fp32 eager, HF fp32 compiled,
torchao int8 / int4 compiled and llama.cpp on the GGUF the model ships as (SmolLM2 Q4_1, Gemma-3 Q4_K_M), all in
one process, interleaved rounds, medians. llama.cpp runs with `logits_all=False` (its default: only the last
position's logits, as generation needs); quality scoring uses a second instance with all logits. Quality:
perplexity on pydoc_data.topics (512-token windows), KL to fp32 logits, greedy-token agreement with fp32.
Roofline: weight bytes per token / triad bandwidth (same run). Also llama.cpp on the shipped file requantized to
Q8_0 by llama.cpp's own quantizer, and optpass int8 / int4 at batch 8 (eight different prompts in one call; the
row's decode rate is the aggregate).

    python benchmarks/decode.py [--model gemma3-270m] [--rounds 5] [--ppl-windows 16] [--only optpass-auto,hf-fp32]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import Variant, run_scenario  # noqa: E402
from optpass.corpus import token_windows  # noqa: E402
from optpass.hf_compat import with_cache  # noqa: E402
from optpass.measure import weight_bytes  # noqa: E402
from optpass.models import gemma3_gguf_path, load_gemma3_270m, load_smollm2, smollm2_gguf_path  # noqa: E402

MODELS = {"smollm2": (load_smollm2, smollm2_gguf_path), "gemma3-270m": (load_gemma3_270m, gemma3_gguf_path)}

NEW, PROMPT, PREFILL = 128, 64, 512
BATCH = 8  # rows of the batched arms (`-b8`)


def triad_gbps(n: int = 1 << 26, reps: int = 5) -> float:
    """Fused triad a = b + q*c (3 arrays of n fp32), as in shared/PEERS.md; median GB/s."""
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        times.append(time.perf_counter() - t)
    return 3 * 4 * n / sorted(times)[len(times) // 2] / 1e9


class HFRunner:
    """A HF model (optionally through its static-cache compile path, or optpass's fast generate)."""

    def __init__(self, model: Any, compiled: bool = False) -> None:
        self.model, self.compiled = model, compiled
        if compiled:
            from transformers import CompileConfig, StaticCache

            # decode gets a 256-slot cache, as optpass's bucket for 64 + 128 tokens; prefill-512 its own
            # (HF runs prefill eager and compiles only the decode step, so the second cache compiles nothing)
            self.caches = {n: StaticCache(config=model.config, max_cache_len=n) for n in (256, PREFILL + 8)}
            self.config = CompileConfig(fullgraph=False, dynamic=False)
            self.config._compile_all_devices = True

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, new: int) -> torch.Tensor:
        kwargs: dict[str, Any] = {"max_new_tokens": new, "do_sample": False}
        if self.compiled:
            cache = self.caches[256 if ids.shape[1] + new <= 256 else PREFILL + 8]
            cache.reset()
            kwargs.update(**with_cache(self.model, cache), compile_config=self.config)
        if new > 1:
            kwargs["min_new_tokens"] = new  # EOS suppressed: every config decodes all 128 tokens
        return self.model.generate(ids, **kwargs)

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits.float()


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python on the GGUF the model ships as. Timing runs `logits_all=False` (the
    head only at the last position, as in generation); `logits()` scores quality on a second instance."""

    def __init__(self, gguf: Path) -> None:
        from llama_cpp import Llama

        self.gguf = gguf
        self.llm = Llama(model_path=str(gguf), n_threads=2, n_threads_batch=2, n_ctx=PREFILL + 16,
                         n_batch=512, n_ubatch=512, logits_all=False, verbose=False)
        self.vocab = self.llm.n_vocab()
        self.scorer: Any = None

    def generate(self, ids: torch.Tensor, new: int) -> torch.Tensor:
        import numpy as np

        import llama_cpp

        self.llm.reset()
        self.llm.eval(ids[0].tolist())
        out = []
        for i in range(new):
            # with logits_all=False, `Llama.eval` keeps no scores (llama-cpp-python >= 0.3.2x): read the last
            # position's logits from the context, as llama.cpp's own samplers do
            last = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
            tok = int(np.argmax(np.ctypeslib.as_array(last, shape=(self.vocab,))))
            out.append(tok)
            if i + 1 < new:
                self.llm.eval([tok])
        return torch.cat([ids, torch.tensor([out])], dim=1)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        from llama_cpp import Llama

        if self.scorer is None:
            self.scorer = Llama(model_path=str(self.gguf), n_threads=2, n_threads_batch=2, n_ctx=PREFILL + 16,
                                n_batch=512, n_ubatch=512, logits_all=True, verbose=False)
        self.scorer.reset()
        self.scorer.eval(ids[0].tolist())
        return torch.from_numpy(self.scorer.scores[: ids.shape[1]].copy()).float()[None]


def decode_rate(runner: Any, prompt: torch.Tensor, new: int = NEW) -> float:
    """(new - 1) / (T(new) - T(1 new)): decode only, prefill subtracted (as in shared/PEERS.md)."""
    t = time.perf_counter()
    runner.generate(prompt, 1)
    first = time.perf_counter() - t
    t = time.perf_counter()
    runner.generate(prompt, new)
    return (new - 1) / (time.perf_counter() - t - first)


def prefill_ms(runner: Any, ids: torch.Tensor) -> float:
    t = time.perf_counter()
    runner.generate(ids, 1)
    return 1e3 * (time.perf_counter() - t)


# the fixed-scheme rows show a scheme's speed and quality even where the default budget (ppl 1% + KL 0.01) would
# roll it back; `optpass-auto` is the row the default budget decides
FIXED_BUDGET = "ppl:10%"


def build_variants(model: Any, tok: Any, only: set[str] | None, gguf: Path) -> list[tuple[str, Any, str]]:
    """(name, setup function, note) for every config; setup returns a runner."""
    batch_prompts = token_windows(tok, PROMPT, BATCH)  # row 0 is the batch-1 prompt: greedy match checks it
    import optpass
    from optpass.passes.quantize import QuantizeConfig

    def optpass_variant(cfg: QuantizeConfig | None, budget: str | None = None) -> Any:
        out = optpass.optimize(copy.deepcopy(model), target="cpu", passes="auto" if cfg is None else [cfg],
                               quality_budget=budget)
        print(out.optpass_report, flush=True)
        if cfg is not None and "quantize" not in out.optpass_report.applied:  # not the row its name promises
            raise RuntimeError(f"quantize was not applied: {out.optpass_report.passes[0].reason}")
        return HFRunner(out)

    def torchao(config_name: str, optpass_loop: bool = False) -> Any:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        m = copy.deepcopy(model).bfloat16()
        if config_name == "int8":
            quantize_(m, Int8WeightOnlyConfig())
        else:
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            quantize_(m, PrototypeInt4WeightOnlyConfig(group_size=32))
        if optpass_loop:  # torchao's kernels in optpass's decode loop: separates the kernel gain from the loop's
            from optpass.backends.runtime import DecodePlan, install_runtime

            return HFRunner(install_runtime(m, DecodePlan(compiled_step=True)))
        return HFRunner(m, compiled=True)

    configs = [
        ("hf-fp32", lambda: HFRunner(model), "HF eager fp32"),
        ("hf-fp32-compile", lambda: HFRunner(copy.deepcopy(model), compiled=True), "HF StaticCache + torch.compile"),
        ("ao-int8-compile", lambda: torchao("int8"), "torchao Int8WeightOnlyConfig, bf16 act, compiled"),
        ("ao-int8-optpass-loop", lambda: torchao("int8", optpass_loop=True), "torchao Int8WeightOnlyConfig, bf16 "
         "act, through optpass's compiled decode runtime (same loop as the optpass rows)"),
        ("ao-int4-compile", lambda: torchao("int4"), "torchao PrototypeInt4WeightOnlyConfig g32 (LM head too), compiled"),
        ("optpass-auto", lambda: optpass_variant(None), "optimize(model, target='cpu'): the plan the cost model and "
         "the default quality budget choose"),
        ("optpass-auto-quant", lambda: optpass_variant(QuantizeConfig()), "optimize(model, passes=[QuantizeConfig()]): "
         "the schemes auto's quantize decision keeps under the default budget, without the other passes (no drafter)"),
        ("optpass-int8", lambda: optpass_variant(QuantizeConfig(weights="int8", lm_head="int8"), FIXED_BUDGET),
         f"int8 weights + int8 head, fp32 act GEMV, compiled static decode (budget {FIXED_BUDGET})"),
        ("optpass-int8-w8a8", lambda: optpass_variant(QuantizeConfig(weights="int8", lm_head="int8", w8a8=True),
                                                      FIXED_BUDGET),
         f"int8 weights + int8 head, W8A8 (int8 activations, torch._int_mm) above the cost model's row crossover: "
         f"prefill and the perplexity windows, not the 1-row decode steps (budget {FIXED_BUDGET})"),
        ("optpass-int8g", lambda: optpass_variant(QuantizeConfig(weights="int8_grouped", lm_head="int8")),
         "int8 g32 blocks (GGUF blocks re-pack exactly) + int8 head, compiled static decode"),
        ("optpass-int4", lambda: optpass_variant(QuantizeConfig(weights="int4", lm_head="int8"), FIXED_BUDGET),
         f"int4 g32 blocks + int8 head, compiled static decode (budget {FIXED_BUDGET})"),
    ]
    # batch 8: eight different 64-token prompts in one call; the row's decode_tok_s is the aggregate (8 rows)
    configs += [(f"{name}-b8", lambda setup=setup: BatchedRunner(setup(), batch_prompts), f"{note}; batch 8, aggregate")
                for name, setup, note in configs if name in ("optpass-int8", "optpass-int4")]
    if importlib.util.find_spec("llama_cpp") is not None:
        kind = gguf.stem.rsplit(".", 1)[-1].rsplit("-", 1)[-1].lower()
        version = _version("llama-cpp-python")
        configs.append((f"llama.cpp-{kind}", lambda: LlamaCppRunner(gguf), f"llama-cpp-python {version}, "
                        f"the shipped {gguf.name}, n_threads=2, logits_all=False"))
        if kind != "q8_0":
            configs.append(("llama.cpp-q8_0", lambda: LlamaCppRunner(q8_0_copy(gguf)), f"llama-cpp-python {version}, "
                            f"{gguf.name} requantized to Q8_0 by llama.cpp's own quantizer, n_threads=2, logits_all=False"))
    return [c for c in configs if only is None or c[0] in only]


def q8_0_copy(gguf: Path) -> Path:
    """The shipped GGUF requantized to Q8_0 by llama.cpp itself (`llama_model_quantize`, allow_requantize: the
    shipped file holds no float weights), cached beside the optpass conversions."""
    import llama_cpp

    from optpass.models import cache_dir

    out = cache_dir() / "gguf" / f"{gguf.stem}.requantized-Q8_0.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, True, 2
        partial = out.with_suffix(".partial")
        if llama_cpp.llama_model_quantize(str(gguf).encode(), str(partial).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not requantize {gguf} to Q8_0")
        partial.rename(out)
    return out


class BatchedRunner:
    """A runner whose 64-token decode call runs `prompts` (a [B, 64] batch of different prompts, row 0 the batch-1
    prompt, so the greedy match checks a batched row) instead of the one prompt; prefill and perplexity go to the
    wrapped runner (one row)."""

    def __init__(self, runner: Any, prompts: torch.Tensor) -> None:
        self.runner, self.prompts, self.model = runner, prompts, runner.model

    def generate(self, ids: torch.Tensor, new: int) -> torch.Tensor:
        if ids.shape[1] == self.prompts.shape[1]:
            return self.runner.generate(self.prompts, new)
        return self.runner.generate(ids, new)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.runner.logits(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ppl-windows", type=int, default=16)
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    os.environ.setdefault("OPTPASS_PROGRESS", "0")
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # the recommended CPU inference setting, for every compiled peer
    load, gguf_path = MODELS[args.model]
    model, tok = load()
    gguf = gguf_path()
    prompt = token_windows(tok, PROMPT, 1)
    long_prompt = token_windows(tok, PREFILL, 1, offset_windows=1)
    windows = token_windows(tok, 512, args.ppl_windows)
    with torch.inference_mode():
        reference = [model(input_ids=w[None]).logits.float() for w in windows]
    reference_tokens = HFRunner(model).generate(prompt, NEW)[0, PROMPT:]
    bandwidth = [triad_gbps()]

    def quality(runner: Any) -> dict[str, Any]:
        nll, kl, n = 0.0, 0.0, 0
        for w, ref in zip(windows, reference):
            logits = runner.logits(w[None])
            logp = torch.log_softmax(logits[0, :-1], -1)
            nll += float(-logp.gather(-1, w[1:, None]).sum())
            kl += float(torch.nn.functional.kl_div(logp, torch.log_softmax(ref[0, :-1], -1), log_target=True,
                                                    reduction="sum"))
            n += w.numel() - 1
        tokens = runner.generate(prompt, NEW)[0, PROMPT:]
        match = int((tokens == reference_tokens).int().cumprod(0).sum())
        return {"perplexity": math.exp(nll / n), "kl_vs_fp32": kl / n, "greedy_match": f"{match}/{NEW}",
                "scored_tokens": n}

    variants = []
    for name, setup, note in build_variants(model, tok, set(args.only.split(",")) if args.only else None, gguf):
        def measure(runner: Any) -> dict[str, float]:
            bandwidth.append(triad_gbps())
            rows = runner.prompts.shape[0] if isinstance(runner, BatchedRunner) else 1
            return {"decode_tok_s": rows * decode_rate(runner, prompt), "prefill512_ms": prefill_ms(runner, long_prompt)}

        def timed_setup(setup: Any = setup) -> Any:
            t = time.perf_counter()
            runner = setup()
            runner.generate(prompt, 4)  # compile / warm up
            runner.setup_s = time.perf_counter() - t
            return runner

        variants.append(Variant(name, timed_setup, measure, quality=lambda r: {**quality(r), **footprint(r)}, note=note))

    def footprint(runner: Any) -> dict[str, Any]:
        m = getattr(runner, "model", None)
        if m is None:
            return {"setup_s": round(runner.setup_s, 1), "weight_mb_per_token": gguf.stat().st_size / 1e6}
        return {"setup_s": round(runner.setup_s, 1), "weight_mb_per_token": decode_bytes(m) / 1e6}

    result = run_scenario(f"decode_{args.model.replace('-', '_')}", variants, rounds=args.rounds,
                          extra={"triad_gbps_median": sorted(bandwidth)[len(bandwidth) // 2]})
    add_roofline(result)


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes, looking inside tensor subclasses (torchao keeps qdata / scales / zeros inside)."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def decode_bytes(model: Any) -> int:
    """Weight bytes one decode step reads: every linear incl. the LM head (as stored), norms, one embedding row."""
    from optpass.backends.cpu.quant_linear import QuantizedLinear

    total = 0
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            total += m.decode_bytes()
        elif isinstance(m, torch.nn.Linear):
            total += tensor_bytes(m.weight)
        elif "Norm" in type(m).__name__ and getattr(m, "weight", None) is not None:
            total += tensor_bytes(m.weight)
    emb = model.get_input_embeddings().weight
    return total + tensor_bytes(emb) // emb.shape[0]


def _version(module: str) -> str:
    from importlib.metadata import version

    try:
        return version(module.replace("_", "-"))
    except Exception:  # noqa: BLE001
        return "?"


def add_roofline(result: dict[str, Any]) -> None:
    from benchmarks.harness import write

    bw = result["triad_gbps_median"] * 1e9
    for row in result["rows"]:
        if "weight_mb_per_token" in row and "decode_tok_s" in row:
            roof = bw / (row["weight_mb_per_token"] * 1e6)
            row["roofline_tok_s"] = roof
            row["roofline_fraction"] = row["decode_tok_s"]["median"] / roof
    write(result["scenario"], result)


if __name__ == "__main__":
    main()
