"""KV-cache compression quality on SmolLM2-135M (or Gemma-3 270M, `--model`; its sliding layers keep their window,
packed like the compressed ones): passkey retrieval at 1k / 2k / 4k context (several depths)
and the KL / perplexity change of a 64-token continuation after a compressed 2k prefix, for every policy at
keep ratios 0.5 / 0.25 / 0.125 with int8 KV, next to the full cache and (with --peer-python) NVIDIA kvpress's
same policies on the same prompts, run in its own virtualenv (it needs transformers <= 5.2).

Each prompt is prefilled once (prefill attention is exact, so every arm sees the same prompt states);
each arm's cache is then built from the recorded states and greedy decoding continues through it.

    python benchmarks/kv_quality.py [--model gemma3-270m] [--contexts 2048 4096] [--arms snapkv] [--keeps 0.25]
        [--quick] [--peer-python /path/to/kvpress-venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import machine_info  # noqa: E402
from optpass.backends.kv import CompressedKVCache, KVSettings, enable_compressed_attention  # noqa: E402
from optpass.corpus import PASSKEY_QUESTION, passkey_prompt, token_windows  # noqa: E402
from optpass.hf_compat import layer_kinds, with_cache  # noqa: E402
from optpass.models import cache_dir, load_gemma3_270m, load_smollm2  # noqa: E402
from optpass.progress import track  # noqa: E402
from optpass.quality import logits_kl, top1_agreement  # noqa: E402

ANSWER_TOKENS = 8
POLICIES = {  # arm name -> KVSettings fields besides keep
    "streaming": {"policy": "streaming"},
    "h2o": {"policy": "h2o"},
    "snapkv": {"policy": "snapkv"},
    "snapkv+merge": {"policy": "snapkv", "merge_threshold": 0.9},
    "snapkv+pyramid": {"policy": "snapkv", "schedule": "pyramid"},
}
PEER_PRESSES = {"streaming": "StreamingLLMPress", "snapkv": "SnapKVPress", "h2o": "ObservedAttentionPress"}


def settings_for(arm: str, keep: float, config: Any) -> KVSettings:
    from optpass.backends.kv.policies.budgets import schedule_weights

    fields = dict(POLICIES[arm])
    schedule = fields.pop("schedule", "uniform")
    full = sum(k.kind == "full_attention" for k in layer_kinds(config))  # budgets cover the compressed layers
    weights = schedule_weights(schedule, full) if schedule != "uniform" else None
    return KVSettings(keep=keep, bits=8, layer_weights=weights, **fields)


@torch.no_grad()
def greedy_from(model: torch.nn.Module, cache: Any, first: torch.Tensor, start: int, steps: int) -> list[int]:
    tokens = [int(first)]
    token = first.view(1, 1)
    for i in range(steps - 1):
        logits = model(input_ids=token, **with_cache(model, cache), position_ids=torch.tensor([[start + i]]),
                       use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
    return tokens


def question_tokens(tok: Any, ids: list[int]) -> int:
    """How many trailing prompt tokens carry the question: the part kvpress's pipeline feeds uncompressed after it
    compresses the context. The smallest tail that decodes to the whole question (its first token may also
    carry a few characters of the haystack)."""
    for k in range(1, len(ids)):
        if PASSKEY_QUESTION.strip() in tok.decode(ids[-k:]):
            return k
    raise ValueError("passkey prompt does not end with the question")


def full_cache(recorded: CompressedKVCache, config: Any) -> DynamicCache:
    cache = DynamicCache(config=config)  # transformers' own: sliding layers keep their window
    for i, layer in enumerate(recorded.layers):
        cache.update(layer.prompt[1], layer.prompt[2], i)
    return cache


@torch.no_grad()
def passkey(model: Any, tok: Any, contexts: list[int], depths: list[float], keeps: list[float], arms: list[str]) -> dict:
    config = model.config
    hits: dict[str, dict[int, list[int]]] = {}
    prompts = []
    cases = [(c, d) for c in contexts for d in depths]
    for ctx, depth in track(cases, "passkey"):
        key = 10000 + (ctx * 31 + int(depth * 1000) * 7919) % 89999
        ids, answer = passkey_prompt(tok, ctx, depth, key, seed=int(depth * 10))
        prompts.append({"context": ctx, "depth": depth, "ids": ids[0].tolist(), "answer": answer,
                        "question_tokens": question_tokens(tok, ids[0].tolist())})
        recorded = CompressedKVCache.recording(config)
        first = model(input_ids=ids, **with_cache(model, recorded), use_cache=True).logits[0, -1].argmax()
        s = ids.shape[1]
        runs = {"full": lambda: full_cache(recorded, config)}
        for arm in arms:
            for keep in keeps:
                runs[f"{arm}@{keep}"] = lambda arm=arm, keep=keep: recorded.replay(settings_for(arm, keep, config))
        for name, make in runs.items():
            text = tok.decode(greedy_from(model, make(), first, s, ANSWER_TOKENS), skip_special_tokens=True)
            hits.setdefault(name, {}).setdefault(ctx, []).append(int(answer in text.replace(",", "")))
    return {"accuracy": {n: {c: sum(v) / len(v) for c, v in per.items()} for n, per in hits.items()}, "prompts": prompts}


@torch.no_grad()
def continuation(model: Any, tok: Any, window: int, count: int, keeps: list[float], arms: list[str],
                 tail: int = 64) -> tuple[dict, list]:
    config = model.config
    windows = token_windows(tok, window=window, count=count, offset_windows=5)
    scores: dict[str, dict[str, list[float]]] = {}
    for ids in track(list(windows.split(1)), "continuation"):
        prefix = ids.shape[1] - tail
        ref = model(input_ids=ids, use_cache=False).logits[:, prefix - 1:-1].float()
        target = ids[0, prefix:]
        recorded = CompressedKVCache.recording(config)
        first = model(input_ids=ids[:, :prefix], **with_cache(model, recorded), use_cache=True).logits[:, -1:]
        for arm in arms:
            for keep in keeps:
                cache = recorded.replay(settings_for(arm, keep, config))
                rest = model(input_ids=ids[:, prefix:-1], **with_cache(model, cache), use_cache=True).logits
                new = torch.cat([first, rest], dim=1).float()
                entry = scores.setdefault(f"{arm}@{keep}", {})
                entry.setdefault("kl", []).append(logits_kl(ref, new))
                entry.setdefault("top1", []).append(top1_agreement(ref, new))
                entry.setdefault("nll", []).append(float(torch.nn.functional.cross_entropy(new[0], target)))
                entry.setdefault("ref_nll", []).append(float(torch.nn.functional.cross_entropy(ref[0], target)))
    out = {}
    for name, e in scores.items():
        nll, ref_nll = sum(e["nll"]) / len(e["nll"]), sum(e["ref_nll"]) / len(e["ref_nll"])
        out[name] = {"kl": sum(e["kl"]) / len(e["kl"]), "top1": sum(e["top1"]) / len(e["top1"]),
                     "ppl": float(torch.tensor(nll).exp()), "ppl_full": float(torch.tensor(ref_nll).exp())}
    return out, [w.tolist() for w in windows]


def run_peer(python: str, prompts: list, windows: list, keeps: list[float], tail: int) -> dict:
    """kvpress in its own interpreter, same model directory, prompts and windows."""
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"model_dir": str(cache_dir() / "smollm2-135m-instruct-v1"), "prompts": prompts,
                                   "windows": windows, "keeps": keeps, "tail": tail, "presses": PEER_PRESSES,
                                   "answer_tokens": ANSWER_TOKENS}))
        out = Path(tmp) / "out.json"
        script = Path(__file__).with_name("kv_peer_kvpress.py")
        proc = subprocess.run([python, str(script), str(job), str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
        return json.loads(out.read_text())


def markdown(result: dict) -> str:
    pk, cont, peer = result["passkey"]["accuracy"], result["continuation"], result.get("peer", {})
    contexts = result["contexts"]
    lines = [f"# {result['scenario']}", "", f"`{result['command']}` | {result['date']} | {result['machine']['cpu']}", "",
             f"Passkey accuracy ({len(result['depths'])} depths per context) and continuation quality "
             f"({result['windows']} x {result['window']}-token windows, last 64 tokens scored); int8 KV; "
             "peer = kvpress through its own `kv-press-text-generation` pipeline on the same token ids, as its "
             "documentation uses it: the press compresses the context, the question is fed uncompressed, then greedy "
             "decoding grows the cache; optpass compresses the whole prompt, question included. `full` in the kvpress "
             "columns is the pipeline with no press.", "",
             "| arm | " + " | ".join(f"passkey {c}" for c in contexts) + " | KL | top-1 | ppl (full) | "
             + " | ".join(f"kvpress passkey {c}" for c in contexts) + " | kvpress KL | kvpress ppl |",
             "|---" * (2 * len(contexts) + 7) + "|"]
    for name, acc in pk.items():
        c = cont.get(name, {})
        p = peer.get("passkey", {}).get(name, {}) if isinstance(peer, dict) else {}
        pc = peer.get("continuation", {}).get(name, {}) if isinstance(peer, dict) else {}
        cells = [f"{acc.get(str(x), acc.get(x, float('nan'))):.2f}" for x in contexts]
        cells += [f"{c['kl']:.4f}" if c else "", f"{c['top1']:.3f}" if c else "",
                  f"{c['ppl']:.2f} ({c['ppl_full']:.2f})" if c else ""]
        cells += [f"{p.get(str(x), p.get(x)):.2f}" if p else "" for x in contexts]
        cells += [f"{pc['kl']:.4f}" if pc else "", f"{pc['ppl']:.2f}" if pc else ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if isinstance(peer, dict) and peer.get("error"):
        lines += ["", f"kvpress did not run: {peer['error']}"]
    elif peer:
        lines += ["", f"peer virtualenv: kvpress {peer.get('kvpress')}, transformers {peer.get('transformers')}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1k context, 2 depths, one ratio: checks the harness")
    ap.add_argument("--peer-python", default=None, help="python of a virtualenv with kvpress + transformers<=5.2")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3-270m"])
    ap.add_argument("--contexts", type=int, nargs="*", default=None)
    ap.add_argument("--arms", nargs="*", default=None, choices=sorted(POLICIES))
    ap.add_argument("--keeps", type=float, nargs="*", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts, depths, keeps = ([1024], [0.25, 0.75], [0.25]) if args.quick else \
        ([1024, 2048, 4096], [0.1, 0.35, 0.6, 0.85], [0.5, 0.25, 0.125])
    window, count = (1024, 1) if args.quick else (2048, 2)
    contexts, keeps = args.contexts or contexts, args.keeps or keeps
    arms = args.arms or list(POLICIES)
    model, tok = (load_gemma3_270m if args.model == "gemma3-270m" else load_smollm2)()
    enable_compressed_attention(model)
    t0 = time.time()
    pk = passkey(model, tok, contexts, depths, keeps, arms)
    cont, windows = continuation(model, tok, window, count, keeps, arms)
    scenario = "kv_quality" if args.model == "smollm2" else "kv_quality_" + args.model.replace("-", "_")
    result = {"scenario": scenario, "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": machine_info(), "contexts": contexts, "depths": depths, "keeps": keeps, "window": window,
              "windows": count, "passkey": {"accuracy": pk["accuracy"]}, "continuation": cont}
    if args.peer_python:
        result["peer"] = run_peer(args.peer_python, pk["prompts"], windows, keeps, 64)
    result["seconds"] = time.time() - t0
    from benchmarks import harness

    harness.RESULTS.mkdir(parents=True, exist_ok=True)
    (harness.RESULTS / f"{scenario}.json").write_text(json.dumps(result, indent=2, default=str))
    (harness.RESULTS / f"{scenario}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
