"""Speculative decoding on SmolLM2-135M int8 (blocks + head, every arm the same weights): optpass's decode runtime
with no drafter, with prompt lookup and with token recycling, against transformers' own loop with its prompt
lookup (`prompt_lookup_num_tokens`, the documented default 10 and optpass's draft length) and its assisted
generation with `assistant_early_exit` (the model's first layers as drafter).

Two prompt sets from `pydoc_data.topics`, through the model's chat template: input-grounded (a ~1k-token
passage, then "summarise" / "repeat the first paragraph": copying pays) and open-ended (a short request for a
story or an explanation: nothing to copy). 128 new tokens, EOS off, greedy. Two throughputs: `tok_s`, new
tokens over the whole `generate()` call (prefill included, the same for every arm), and `decode_tok_s`, the
127 tokens after the first over the time after the prefill (optpass: the engine's own prefill / decode split;
transformers: the call minus a `max_new_tokens=1` call on the same input, as in `../shared/PEERS.md`), which
is what drafting can change. Before timing, every drafting arm's tokens are
compared with the no-drafter arm's on 20 prompts of each set (lossless: identical is the claim).

    python benchmarks/speculative.py [--rounds 5] [--prompts 4] [--check 20] [--batch 1 4]   (--rounds 0: check only)
        [--self-draft]  (adds self-speculative drafting: the pass's search on the same weights, then its setting
                         timed gated and ungated; the ungated arm gives the acceptance drafting really meets)
        [--only NAME ...]  (time only the arms whose names contain one of these)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import Variant, run_scenario  # noqa: E402

NEW = 128
DRAFT = 5
GROUNDED_ASKS = ("Summarize the text above in a few sentences.", "Repeat the first paragraph of the text above.")
OPEN_ASKS = ("Write a short story about {}.", "Explain to a child what {} is.", "Write a poem about {}.")
OPEN_TOPICS = ("a lighthouse keeper", "the moon", "a robot learning to cook", "rain", "a lost key", "volcanoes",
               "friendship", "the ocean", "a busy market", "winter")


def prompts(tok: Any, kind: str, count: int) -> list[torch.Tensor]:
    from pydoc_data.topics import topics

    out = []
    if kind == "grounded":
        passages = [t for _, t in sorted(topics.items()) if len(t) > 4500]
        for i in range(count):
            text = passages[i % len(passages)][:4500]
            out.append(_chat(tok, f"{text}\n\n{GROUNDED_ASKS[i % len(GROUNDED_ASKS)]}"))
    else:
        for i in range(count):
            ask = OPEN_ASKS[i % len(OPEN_ASKS)].format(OPEN_TOPICS[i % len(OPEN_TOPICS)])
            out.append(_chat(tok, ask))
    return out


def _chat(tok: Any, text: str) -> torch.Tensor:
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt")
    return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]


def batched(tok: Any, rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.shape[1] for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.shape[1]:], mask[i, width - r.shape[1]:] = r[0], 1
    return ids, mask


def int8_model() -> tuple[Any, Any]:
    import optpass
    from optpass.models import load_smollm2
    from optpass.passes.quantize import QuantizeConfig
    from optpass.passes.speculative import SpeculativeConfig

    model, tok = load_smollm2()
    model = optpass.optimize(model, passes=[QuantizeConfig(weights="int8", lm_head="int8"),
                                            SpeculativeConfig(draft=DRAFT)])
    return model, tok


def self_draft_search() -> dict[str, Any]:
    """The `speculative` pass's self-drafting search on the same int8 weights (a separate copy): its chosen skip
    set and draft length, acceptance per share skipped, and whether the pass applies it."""
    import optpass
    from optpass.models import load_smollm2
    from optpass.passes.quantize import QuantizeConfig
    from optpass.passes.speculative import SpeculativeConfig

    model, _ = load_smollm2()
    model = optpass.optimize(model, passes=[QuantizeConfig(weights="int8", lm_head="int8"),
                                            SpeculativeConfig(proposer="self_draft", draft=DRAFT)])
    record = next(r for r in model.optpass_report.passes if r.name == "speculative")
    found = {**record.details["self_draft"], "status": record.status, "reason": record.reason}
    print("self-draft search:", {k: v for k, v in found.items() if k != "settings"}, flush=True)
    return found


def runtime_call(model: Any, kind: str | None, **proposer: Any) -> Any:
    """generate() through the runtime with proposer `kind` (None: no drafting) and `proposer` entries replaced,
    same engine, same compiled steps."""
    runtime = model.optpass_runtime
    base = runtime.plan.proposer

    def call(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        engine = runtime.engine
        engine.plan = dataclasses.replace(runtime.plan, proposer={**base, "kind": kind or base["kind"], **proposer})
        return engine.generate(ids, NEW, mask, speculate=kind is not None)

    return call


def transformers_call(model: Any, new: int = NEW, **options: Any) -> Any:
    def call(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        with torch.inference_mode():
            return type(model).generate(model, ids, attention_mask=mask, max_new_tokens=new,
                                        do_sample=False, eos_token_id=None, **options)

    return call


def arm(name: str, call: Any, inputs: list[tuple[torch.Tensor, torch.Tensor | None]], note: str,
        engine: Any = None, first: Any = None) -> Variant:
    def measure(_: Any) -> dict[str, float]:
        tokens, seconds, later, decode_seconds, accepted, verifies = 0, 0.0, 0, 0.0, 0, 0
        for ids, mask in inputs:
            start = time.perf_counter()
            out = call(ids, mask)
            elapsed = time.perf_counter() - start
            seconds += elapsed
            tokens += (out.shape[1] - ids.shape[1]) * ids.shape[0]
            later += (out.shape[1] - ids.shape[1] - 1) * ids.shape[0]  # the tokens after the prefill's one
            if engine is not None:
                accepted += engine.last_timing["accepted_drafts"]
                verifies += engine.last_timing["verify_steps"]
                decode_seconds += engine.last_timing["decode_s"]
            else:  # minus the same input's prefill: a one-new-token call
                start = time.perf_counter()
                first(ids, mask)
                decode_seconds += elapsed - (time.perf_counter() - start)
        metrics = {"tok_s": tokens / seconds, "decode_tok_s": later / decode_seconds}
        if engine is not None and verifies:
            metrics["accepted_per_verify"] = accepted / verifies
        return metrics

    return Variant(name, lambda: None, measure, note=note)


def lossless_check(tok: Any, model: Any, count: int, drafters: dict[str, Any]) -> dict[str, str]:
    """Per prompt set and drafter: how many of `count` prompts decode to exactly the no-drafter tokens."""
    plain = runtime_call(model, None)
    out = {}
    for kind in ("grounded", "open"):
        rows = prompts(tok, kind, count)
        ref = [plain(r, None) for r in rows]
        for name, call in drafters.items():
            same = sum(torch.equal(call(r, None), want) for r, want in zip(rows, ref))
            out[f"{kind}/{name}"] = f"{same}/{count} identical"
        ids, mask = batched(tok, rows[:4])
        batch_ref = plain(ids, mask)
        for name, call in drafters.items():
            out[f"{kind}/{name}/batch4"] = "identical" if torch.equal(call(ids, mask), batch_ref) else "DIFFERENT"
    print("lossless check:", out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=4, help="timed prompts per set")
    ap.add_argument("--check", type=int, default=20, help="prompts per set in the lossless check")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--self-draft", action="store_true", help="add self-speculative drafting arms (the pass's "
                    "searched skip set, gated and ungated) and the search's figures")
    ap.add_argument("--only", nargs="*", default=None, help="time only arms whose name contains one of these")
    args = ap.parse_args()
    search = self_draft_search() if args.self_draft else None
    model, tok = int8_model()
    tok.padding_side = "left"
    engine = model.optpass_runtime.engine
    drafters = {"prompt_lookup": runtime_call(model, "prompt_lookup"),
                "token_recycling": runtime_call(model, "token_recycling")}
    if search is not None:
        chosen = search["chosen"]
        setting = {"layers": chosen["layers"], "draft": chosen["draft"], "verify_cost": chosen["cost"]}
        drafters["self_draft"] = runtime_call(model, "self_draft", **setting)
        drafters["self_draft_ungated"] = runtime_call(model, "self_draft", gated=False, **setting)
    check = lossless_check(tok, model, args.check, drafters) if args.check else {}
    if args.rounds == 0:  # the lossless check only
        return
    variants = []
    prefill = transformers_call(model, new=1)
    for kind in ("grounded", "open"):
        rows = prompts(tok, kind, args.prompts)
        for batch in args.batch:
            inputs = [(r, None) for r in rows] if batch == 1 else \
                [batched(tok, rows[i:i + batch]) for i in range(0, len(rows), batch)]
            tag = f"{kind}/b{batch}"
            variants += [
                arm(f"{tag}/optpass-int8", runtime_call(model, None), inputs, "compiled static step, no drafter", engine),
                arm(f"{tag}/optpass-int8+prompt-lookup", runtime_call(model, "prompt_lookup"), inputs,
                    f"draft {DRAFT}, gated", engine),
                arm(f"{tag}/optpass-int8+token-recycling", runtime_call(model, "token_recycling"), inputs,
                    f"draft {DRAFT}, gated", engine),
                arm(f"{tag}/transformers-int8", transformers_call(model), inputs, "transformers' loop, same weights",
                    first=prefill),
            ]
            if search is not None:
                skipped = f"skip {search['chosen']['skipped']} blocks, draft {search['chosen']['draft']}"
                variants += [arm(f"{tag}/optpass-int8+self-draft", drafters["self_draft"], inputs,
                                 f"{skipped}, gated (the pass: {search['status']})", engine),
                             arm(f"{tag}/optpass-int8+self-draft-ungated", drafters["self_draft_ungated"], inputs,
                                 f"{skipped}, drafts at every step", engine)]
            if batch == 1:  # transformers' candidate generators take batch 1 only
                variants += [
                    arm(f"{tag}/transformers-int8+prompt-lookup-10", transformers_call(model, prompt_lookup_num_tokens=10),
                        inputs, "prompt_lookup_num_tokens=10 (documented default)", first=prefill),
                    arm(f"{tag}/transformers-int8+prompt-lookup-{DRAFT}",
                        transformers_call(model, prompt_lookup_num_tokens=DRAFT), inputs, f"prompt_lookup_num_tokens={DRAFT}",
                        first=prefill),
                    arm(f"{tag}/transformers-int8+early-exit-8", transformers_call(model, assistant_early_exit=8), inputs,
                        "assistant_early_exit=8 (first 8 of 30 layers draft)", first=prefill),
                ]
    if args.only:
        variants = [v for v in variants if any(part in v.name for part in args.only)]
    # a run of a subset of batch sizes or arms gets its own file, so it never overwrites the full table
    scenario = "speculative_smollm2" + ("" if sorted(args.batch) == [1, 4] else "_b" + "_".join(map(str, args.batch)))
    scenario += "_self_draft" if args.self_draft else ""
    scenario += "_only" if args.only else ""
    extra = {"lossless_check": check, "self_draft_search": search}
    result = run_scenario(scenario, variants, rounds=args.rounds, extra=extra)
    for metric in ("tok_s", "decode_tok_s"):
        rates = {row["variant"]: row[metric]["median"] for row in result["rows"] if metric in row}
        for tag in sorted({name.rsplit("/", 1)[0] for name in rates}):
            base = rates.get(f"{tag}/optpass-int8")
            if base:
                line = ", ".join(f"{n.rsplit('/', 1)[1]} {r / base:.2f}x" for n, r in rates.items()
                                 if n.startswith(tag + "/"))
                print(f"{tag} {metric}: vs optpass-int8 without drafting: {line}")


if __name__ == "__main__":
    main()
