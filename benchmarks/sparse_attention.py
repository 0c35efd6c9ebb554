"""Block-sparse prefill attention on SmolLM2-135M (fp32): the plan `optimize(passes=["sparse_attention"])` chooses,
against dense SDPA, each pattern applied uniformly, and a peer (PyTorch FlexAttention with a hand-written
sliding-window block mask, what a user would write), in one process.

- the lowering alone: every layer on a dense layout through the same block-sparse lowering ("uniform dense layout");
- attention time: every layer's attention over the queries / keys a real corpus prefill produces, summed over
  layers (the plan's layout building and online block choice included), interleaved rounds, median;
- time to first token: the whole prefill forward (`logits_to_keep=1`), interleaved rounds, median;
- quality on a long corpus document (disjoint from the pass's calibration and evaluation text): perplexity over
  all tokens and over the second half, KL and top-1 vs dense on the second half;
- passkey retrieval at 4k and 8k (needle at several depths), dense vs the plan.

    python benchmarks/sparse_attention.py [--model smollm2] [--lengths 1024,2048,4096,8192] [--rounds 3] [--budget ppl:2%]

Other models (e.g. `--model gemma3-270m`): only full-attention layers are planned and timed (sliding-window layers
keep their own attention), and the FlexAttention peer, which would replace every layer's attention, is left out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import RESULTS, machine_info  # noqa: E402
from optpass.hf_compat import full_attention_layers  # noqa: E402
from optpass.measure import interleaved_rounds  # noqa: E402

# "dense layout" runs every block through the same lowering as the plan: the kernel's own gain over SDPA, without
# any sparsity (on AVX-512 BF16 CPUs the lowering is optpass's bf16 kernel)
UNIFORM = {"dense layout": {"name": "dense"},
           "a_shape w1024": {"name": "a_shape", "sink": 64, "window": 1024},
           "block_topp p0.9": {"name": "block_topp", "p": 0.9, "samples": 4},
           "vertical_slash v64 s16": {"name": "vertical_slash", "vertical": 64, "slash": 16, "last": 64}}
PEER_WINDOWS = (1024, 2048)


class UserFlexWindow:
    """The peer: FlexAttention with a sliding-window mask_mod, its block mask built by `create_block_mask` once
    per length and cached, compiled as FlexAttention's documentation recommends, registered through transformers'
    AttentionInterface."""

    def __init__(self, window: int) -> None:
        from torch.nn.attention.flex_attention import flex_attention

        self.window, self.masks = window, {}
        self.flex = torch.compile(flex_attention, dynamic=True)

    def mask(self, seq: int) -> Any:
        from torch.nn.attention.flex_attention import create_block_mask

        if seq not in self.masks:
            window = self.window

            def sliding(b, h, q, k):
                return (q >= k) & (q - k < window)
            self.masks[seq] = create_block_mask(sliding, None, None, seq, seq, device="cpu")
        return self.masks[seq]

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        if query.shape[2] == 1:  # decode steps: dense
            return F.scaled_dot_product_attention(query, key, value, scale=scale, enable_gqa=True)
        return self.flex(query, key, value, block_mask=self.mask(query.shape[2]), scale=scale, enable_gqa=True)

    def register(self, name: str) -> str:
        from transformers import AttentionInterface

        def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            return self.attend(query, key, value, scaling).transpose(1, 2).contiguous(), None
        AttentionInterface.register(name, attention)
        return name


def uniform_plans(model: Any, spec: dict[str, Any]) -> dict[int, Any]:
    from optpass.backends.sparse import LayerSparsity
    from optpass.passes.sparse_attention import attention_modules

    heads, full = model.config.num_attention_heads, set(full_attention_layers(model.config))
    return {i: LayerSparsity(tuple(dict(spec) for _ in range(heads)), 2) for i in attention_modules(model) if i in full}


class Arms:
    """One model, switched between arms: plans installed on its attention modules, or a peer implementation."""

    def __init__(self, model: Any, chosen: dict[int, Any]) -> None:
        self.model, self.routed = model, model.config._attn_implementation
        self.plans = {"dense": {}, "optpass plan": chosen,
                      **{f"uniform {k}": uniform_plans(model, v) for k, v in UNIFORM.items()}}
        # the peer replaces every layer's attention: only comparable where every layer is a full-attention one
        every_layer_full = len(full_attention_layers(model.config)) == model.config.num_hidden_layers
        self.peers = {f"peer flex window {w}": UserFlexWindow(w) for w in PEER_WINDOWS} if every_layer_full else {}
        for name, peer in self.peers.items():
            peer.register(name.replace(" ", "_"))

    def use(self, arm: str) -> None:
        from optpass.passes.sparse_attention import ATTRIBUTE, attention_modules, install

        for m in attention_modules(self.model).values():
            if hasattr(m, ATTRIBUTE):
                delattr(m, ATTRIBUTE)
        if arm in self.peers:
            self.model.set_attn_implementation(arm.replace(" ", "_"))
            return
        if self.model.config._attn_implementation != self.routed:
            self.model.set_attn_implementation(self.routed)
        install(self.model, self.plans[arm])


def attention_seconds(arms: Arms, arm: str, records: dict[int, tuple], seq: int) -> float:
    """Every layer's attention for this arm over the recorded queries / keys (keys stand in for values)."""
    from optpass.backends.sparse import block_sparse_attention

    plans = arms.plans.get(arm)
    start = time.perf_counter()
    for i, (q, k, scale) in records.items():
        if arm in arms.peers:
            arms.peers[arm].attend(q, k, k, scale)
            continue
        plan = plans.get(i)
        if plan is not None and plan.applies(seq):
            block_sparse_attention(q, k, k, plan.block_mask(q, k), plan.block, scale)
        else:
            F.scaled_dot_product_attention(q, k, k, scale=scale, is_causal=True, enable_gqa=True)
    return time.perf_counter() - start


@torch.no_grad()
def speed(arms: Arms, ids: torch.Tensor, lengths: list[int], rounds: int, timed_arms: list[str]) -> dict[str, Any]:
    from optpass.backends.sparse.search import capture_queries_keys

    out: dict[str, Any] = {}
    for seq in lengths:
        arms.use("dense")
        full = set(full_attention_layers(arms.model.config))
        records = {i: r for i, r in capture_queries_keys(arms.model, ids[:, :seq]).items() if i in full}
        fns: dict[str, Callable[[], dict[str, float]]] = {}
        for arm in ["dense", "optpass plan", *[f"uniform {k}" for k in UNIFORM], *arms.peers]:
            fns[f"attention {arm}"] = lambda arm=arm: {"s": attention_seconds(arms, arm, records, seq)}
        for arm in [a for a in timed_arms if a in arms.plans or a in arms.peers]:
            def ttft(arm: str = arm) -> dict[str, float]:
                arms.use(arm)
                start = time.perf_counter()
                arms.model(input_ids=ids[:, :seq], use_cache=False, logits_to_keep=1)
                return {"s": time.perf_counter() - start}
            fns[f"ttft {arm}"] = ttft
        samples = interleaved_rounds(fns, rounds, warmup=1,
                                     on_round=lambda r: print(f"[bench] {seq}: round {r + 1}/{rounds}", file=sys.stderr,
                                                              flush=True))
        medians = {name: sorted(v["s"])[len(v["s"]) // 2] for name, v in samples.items()}
        out[str(seq)] = {"median_s": medians, "samples": {n: v["s"] for n, v in samples.items()},
                         "attention_speedup": {n[len("attention "):]: medians["attention dense"] / t
                                               for n, t in medians.items() if n.startswith("attention ")},
                         "ttft_speedup": {n[len("ttft "):]: medians["ttft dense"] / t
                                          for n, t in medians.items() if n.startswith("ttft ")}}
        del records
        print(json.dumps({seq: {k: out[str(seq)][k] for k in ("attention_speedup", "ttft_speedup")}}, indent=1),
              flush=True)
    return out


def next_token_logits(model: Any, ids: torch.Tensor, keep: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll [S - 1], logits of the last `keep` positions) without materialising S x vocabulary logits at once
    (Gemma-3's 262k vocabulary at 8k tokens would be 8.6 GB): the head runs on chunks of the final hidden states,
    and only the chunks' last-`keep` rows are kept."""
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
    head, cap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)
    first_kept = hidden.shape[0] - keep
    nll, kept = [], []
    for a in range(0, hidden.shape[0], chunk):
        logits = head(hidden[a:a + chunk]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        nll.append(F.cross_entropy(logits, ids[0, 1 + a:1 + a + chunk], reduction="none"))
        if a + logits.shape[0] > first_kept:
            kept.append(logits[max(first_kept - a, 0):].clone())
    return torch.cat(nll), torch.cat(kept)


@torch.no_grad()
def quality(arms: Arms, ids: torch.Tensor, kl_tokens: int | None = None) -> dict[str, Any]:
    """Perplexity over all tokens and the second half; KL / top-1 vs dense on the last `kl_tokens` positions (None:
    the second half)."""
    from optpass.metrics import logits_kl, top1_agreement

    half = ids.shape[1] // 2
    window = kl_tokens or (ids.shape[1] - half)
    results, reference = {}, None
    for arm in ["dense", "optpass plan", *[f"uniform {k}" for k in UNIFORM], *arms.peers]:
        arms.use(arm)
        nll, tail = next_token_logits(arms.model, ids, window)
        row = {"ppl": math.exp(float(nll.mean())), "ppl_second_half": math.exp(float(nll[half - 1:].mean()))}
        key = "second_half" if kl_tokens is None else f"last_{window}"
        if reference is None:
            reference = tail
        else:
            row.update({f"kl_{key}": logits_kl(reference[None], tail[None]),
                        f"top1_{key}": top1_agreement(reference[None], tail[None])})
        results[arm] = row
        print(f"[bench] quality {arm}: {row}", file=sys.stderr, flush=True)
    base = results["dense"]
    for row in results.values():
        row["ppl_increase"] = row["ppl"] / base["ppl"] - 1
        row["ppl_second_half_increase"] = row["ppl_second_half"] / base["ppl_second_half"] - 1
    return results


def passkey(arms: Arms, tokenizer: Any, lengths: list[int], depths: tuple[float, ...]) -> dict[str, Any]:
    from optpass.quality import passkey_accuracy

    out = {}
    for arm in ("dense", "optpass plan"):
        arms.use(arm)
        out[arm] = {str(n): passkey_accuracy(arms.model, tokenizer, n, depths, trials=1) for n in lengths}
        print(f"[bench] passkey {arm}: {out[arm]}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    import optpass
    from optpass.corpus import token_windows
    from optpass.models import load_builtin
    from optpass.passes.sparse_attention import ATTRIBUTE, SparseAttentionConfig, attention_modules

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", help="a built-in causal LM (smollm2, gemma3-270m)")
    ap.add_argument("--kl-tokens", type=int, default=None, help="KL / top-1 window (default: the second half)")
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget", default="ppl:2%")
    ap.add_argument("--quality-len", type=int, default=8192)
    ap.add_argument("--passkey", default="4096,8192")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--calibration-len", type=int, default=4096)
    ap.add_argument("--eval-len", type=int, default=None, help="quality window of the pass (default: the context)")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    torch.manual_seed(0)
    model, tokenizer = load_builtin(args.model)
    started = time.perf_counter()
    optimized = optpass.optimize(model.eval(), passes=[SparseAttentionConfig(
        context=max(lengths), calibration_len=args.calibration_len, eval_len=args.eval_len)],
                                 quality_budget=args.budget)
    optimize_s = time.perf_counter() - started
    del model
    record = optimized.optpass_report.passes[0]
    print(optimized.optpass_report, flush=True)
    chosen = {i: getattr(m, ATTRIBUTE) for i, m in attention_modules(optimized).items() if hasattr(m, ATTRIBUTE)}
    arms = Arms(optimized, chosen)
    doc = token_windows(tokenizer, window=max(lengths + [args.quality_len]), count=1, offset_windows=2)
    result: dict[str, Any] = {
        "scenario": f"sparse_attention_{args.model.replace('-', '_')}", "command": " ".join(["python", *sys.argv]), "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "budget": args.budget, "optimize_s": optimize_s,
        "pass": {"status": record.status, "reason": record.reason, "details": record.details},
        "speed": speed(arms, doc, lengths, args.rounds,
                       ["dense", "optpass plan", "uniform dense layout", "peer flex window 1024"]),
    }
    result["quality"] = quality(arms, doc[:, :args.quality_len], args.kl_tokens)
    depths = tuple(float(x) for x in args.depths.split(","))
    result["passkey"] = passkey(arms, tokenizer, [int(x) for x in args.passkey.split(",") if x], depths)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{result['scenario']}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: result[k] for k in ("optimize_s", "quality", "passkey")}, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
