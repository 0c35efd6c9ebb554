"""Peer arm of benchmarks/kv_quality.py: NVIDIA kvpress presses on the same SmolLM2 weights, prompts and windows.

kvpress is used as its README documents it: its `kv-press-text-generation` pipeline compresses the context under
the press, feeds the question uncompressed, then decodes greedily. The pipeline's tokenising step (which would
wrap the text in the chat template) is skipped: its forward step gets kv_quality.py's own token ids, split into
context and question, so both tools see identical tokens.

Runs inside a virtualenv with kvpress and transformers < 5.3 (kvpress 0.5.5 pins it), so it imports nothing from
optpass. Input / output: JSON files given on the command line.

    /path/to/venv/bin/python benchmarks/kv_peer_kvpress.py job.json out.json
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import kvpress  # noqa: F401  (registers the kv-press-text-generation pipeline)


def press_for(name: str, keep: float):
    return getattr(kvpress, name)(compression_ratio=1.0 - keep)


@torch.no_grad()
def answer(pipe, ids: list[int], question_tokens: int, press, max_new_tokens: int) -> str:
    """kvpress's pipeline forward step on pre-tokenised context and question."""
    inputs = {"context_ids": torch.tensor([ids[:-question_tokens]]),
              "questions_ids": [torch.tensor([ids[-question_tokens:]])]}
    return pipe.forward(inputs, press=press, max_new_tokens=max_new_tokens)[0]


@torch.no_grad()
def continuation(model, ids: torch.Tensor, tail: int, press) -> tuple[float, float]:
    """KL to the full model and NLL of the last `tail` tokens, the prefix compressed by the press (kvpress's
    prefill step), the tail fed uncompressed like the pipeline's question."""
    from transformers import DynamicCache

    prefix = ids.shape[1] - tail
    ref = model(input_ids=ids, use_cache=False).logits[0, prefix - 1:-1].float()
    cache = DynamicCache()
    with press(model):
        first = model(input_ids=ids[:, :prefix], past_key_values=cache, use_cache=True).logits[:, -1:]
    stored, n = cache.get_seq_length(), ids.shape[1] - 1 - prefix
    rest = model(input_ids=ids[:, prefix:-1], past_key_values=cache, use_cache=True,
                 position_ids=torch.arange(prefix, prefix + n)[None],
                 cache_position=torch.arange(stored, stored + n)).logits
    new = torch.cat([first, rest], dim=1)[0].float()
    kl = float((ref.softmax(-1) * (ref.log_softmax(-1) - new.log_softmax(-1))).sum(-1).mean())
    return kl, float(F.cross_entropy(new, ids[0, prefix:]))


def main(job_path: str, out_path: str) -> None:
    job = json.load(open(job_path))
    tok = AutoTokenizer.from_pretrained(job["model_dir"])
    models = {impl: AutoModelForCausalLM.from_pretrained(job["model_dir"], attn_implementation=impl,
                                                         dtype=torch.float32).eval()
              for impl in ("sdpa", "eager")}  # ObservedAttentionPress (H2O) needs the attention weights: eager
    pipes = {impl: pipeline("kv-press-text-generation", model=m, tokenizer=tok) for impl, m in models.items()}
    passkey: dict = {}
    continuation_scores: dict = {}
    arms = [("full", None, None)] + [(f"{arm}@{keep}", name, keep)
                                     for arm, name in job["presses"].items() for keep in job["keeps"]]
    for label, press_name, keep in arms:
        impl = "eager" if press_name == "ObservedAttentionPress" else "sdpa"
        hits: dict = {}
        for p in job["prompts"]:
            press = press_for(press_name, keep) if press_name else None
            text = answer(pipes[impl], p["ids"], p["question_tokens"], press, job["answer_tokens"])
            hits.setdefault(str(p["context"]), []).append(int(p["answer"] in text.replace(",", "")))
        passkey[label] = {c: sum(v) / len(v) for c, v in hits.items()}
        if press_name:
            scores = [continuation(models[impl], torch.tensor([w]), job["tail"], press_for(press_name, keep))
                      for w in job["windows"]]
            nll = sum(s[1] for s in scores) / len(scores)
            continuation_scores[label] = {"kl": sum(s[0] for s in scores) / len(scores),
                                          "ppl": float(torch.tensor(nll).exp())}
        print(label, passkey[label], continuation_scores.get(label), file=sys.stderr, flush=True)
    json.dump({"passkey": passkey, "continuation": continuation_scores, "kvpress": version("kvpress"),
               "transformers": version("transformers")}, open(out_path, "w"), indent=2)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
