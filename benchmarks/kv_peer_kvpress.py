"""Peer arm of benchmarks/kv_quality.py: NVIDIA kvpress presses on the same SmolLM2 weights, prompts and windows.

Runs inside a virtualenv with kvpress and transformers <= 5.2 (kvpress breaks on newer transformers), so it
imports nothing from optpass. Input / output: JSON files given on the command line.

    /path/to/venv/bin/python benchmarks/kv_peer_kvpress.py job.json out.json
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache


def press_for(name: str, keep: float):
    import kvpress

    return getattr(kvpress, name)(compression_ratio=1.0 - keep)


@torch.no_grad()
def prefill(model, ids: torch.Tensor, press) -> tuple[DynamicCache, torch.Tensor]:
    cache = DynamicCache()
    with press(model):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    return cache, logits


@torch.no_grad()
def greedy(model, cache, first: torch.Tensor, start: int, steps: int) -> list[int]:
    tokens, token = [int(first)], first.view(1, 1)
    for i in range(steps - 1):
        # true positions for RoPE; cache positions index the (compressed) cache, as kvpress's pipeline does
        stored = cache.get_seq_length()
        logits = model(input_ids=token, past_key_values=cache, position_ids=torch.tensor([[start + i]]),
                       cache_position=torch.tensor([stored]), use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
    return tokens


def main(job_path: str, out_path: str) -> None:
    job = json.load(open(job_path))
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    models = {impl: AutoModelForCausalLM.from_pretrained(job["model_dir"], attn_implementation=impl, dtype=torch.float32).eval()
              for impl in ("sdpa", "eager")}
    passkey: dict = {}
    continuation: dict = {}
    for arm, press_name in job["presses"].items():
        model = models["eager" if press_name == "ObservedAttentionPress" else "sdpa"]
        for keep in job["keeps"]:
            name = f"{arm}@{keep}"
            hits: dict = {}
            for p in job["prompts"]:
                ids = torch.tensor([p["ids"]])
                cache, logits = prefill(model, ids, press_for(press_name, keep))
                text = tok.decode(greedy(model, cache, logits[0, -1].argmax(), ids.shape[1], job["answer_tokens"]),
                                  skip_special_tokens=True)
                hits.setdefault(str(p["context"]), []).append(int(p["answer"] in text.replace(",", "")))
            passkey[name] = {c: sum(v) / len(v) for c, v in hits.items()}
            kls, nll = [], []
            for w in job["windows"]:
                ids = torch.tensor([w])
                prefix = ids.shape[1] - job["tail"]
                ref = models["sdpa"](input_ids=ids, use_cache=False).logits[0, prefix - 1:-1].float()
                cache, first = prefill(model, ids[:, :prefix], press_for(press_name, keep))
                stored, n = cache.get_seq_length(), ids.shape[1] - 1 - prefix
                rest = model(input_ids=ids[:, prefix:-1], past_key_values=cache, use_cache=True,
                             position_ids=torch.arange(prefix, prefix + n)[None],
                             cache_position=torch.arange(stored, stored + n)).logits
                new = torch.cat([first[:, -1:], rest], dim=1)[0].float()
                kls.append(float((ref.log_softmax(-1).exp() * (ref.log_softmax(-1) - new.log_softmax(-1))).sum(-1).mean()))
                nll.append(float(F.cross_entropy(new, ids[0, prefix:])))
            continuation[name] = {"kl": sum(kls) / len(kls), "ppl": float(torch.tensor(sum(nll) / len(nll)).exp())}
            print(name, passkey[name], continuation[name], file=sys.stderr, flush=True)
    json.dump({"passkey": passkey, "continuation": continuation, "kvpress": __import__("kvpress").__version__
               if hasattr(__import__("kvpress"), "__version__") else "0.5.5"}, open(out_path, "w"), indent=2)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
