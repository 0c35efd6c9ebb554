"""Speculative decoding on the decode runtime: proposers, the verifier's acceptance (greedy: the model's own
tokens; sampling: the model's own distribution), cache rollback (static and sliding-window ring layers), the
`speculative` pass end to end, drafting on a compressed (evicting) cache, and where drafting is refused."""

from __future__ import annotations

import itertools
from dataclasses import asdict

import pytest
import torch

import optpass
from optpass.backends.kv import KVSettings
from optpass.backends.runtime import DecodeEngine, DecodePlan
from optpass.backends.runtime.proposers import PromptLookup, TokenRecycling
from optpass.backends.runtime.verify import TokenChoice, accept
from optpass.backends.runtime.sampler import processors
from optpass.models import tiny_llama
from tests import model_zoo

PROPOSERS = ("prompt_lookup", "token_recycling")


def _plan(kind: str, draft: int = 4, **extra) -> DecodePlan:
    return DecodePlan(compiled_step=True, max_cache_len=256, proposer={"kind": kind, "draft": draft}, **extra)


def _repeating_prompts(count: int, batch: int = 1, vocab: int = 100, seed: int = 0) -> list[torch.Tensor]:
    """Prompts whose tail repeats an earlier stretch (so drafts are proposed, some accepted, some not)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        base = torch.randint(0, vocab, (batch, int(torch.randint(6, 16, (1,), generator=g))), generator=g)
        out.append(torch.cat([base, torch.randint(0, vocab, (batch, 3), generator=g), base], dim=1))
    return out


def _hf_greedy(model, ids, new, **kwargs):
    return type(model).generate(model, ids, max_new_tokens=new, do_sample=False, eos_token_id=None, **kwargs)


@torch.no_grad()
def _forward_greedy(model, ids, new):
    """Greedy decoding by the model's own forward and transformers' default cache, one token at a time (the
    reference for Gemma-3: on one near-tie of the tiny model, `generate()`'s own cache choice picks the other
    token than this loop and a full forward both do)."""
    out = model(input_ids=ids, use_cache=True)
    seq = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    cache = out.past_key_values
    for _ in range(new - 1):
        out = model(input_ids=seq[:, -1:], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        seq = torch.cat([seq, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def test_prompt_lookup_takes_the_most_recent_match_and_pads_a_short_tail():
    lookup = PromptLookup(max_ngram=3, min_ngram=2)
    ids = torch.tensor([[5, 6, 7, 1, 5, 6, 8, 9, 5, 6]])
    assert lookup.propose(ids, 2).tolist() == [[8, 9]]  # "5 6" last seen before "8 9"
    assert lookup.propose(torch.tensor([[1, 2, 3, 1, 2]]), 3).tolist() == [[3, 1, 2]]
    assert lookup.propose(torch.tensor([[4, 1, 2, 9, 1, 2]]), 3).tolist() == [[9, 1, 2]]
    assert lookup.propose(torch.tensor([[1, 2, 3, 4]]), 3) is None  # no earlier 2-gram match
    # batches: a row without a match gets a filler draft, the call still proposes for the others
    batch = torch.tensor([[1, 2, 3, 1, 2], [7, 8, 9, 10, 11]])
    assert lookup.propose(batch, 1).tolist() == [[3], [11]]


def test_token_recycling_follows_the_models_own_top_candidates():
    recycle = TokenRecycling(vocab=10, width=2)
    assert recycle.propose(torch.tensor([[3]]), 2) is None  # nothing seen yet
    logits = torch.zeros(1, 2, 10)
    logits[0, 0, 4], logits[0, 1, 3] = 5.0, 5.0  # after 3 the model liked 4; after 4 it liked 3
    recycle.observe(torch.tensor([[3, 4]]), logits)
    assert recycle.propose(torch.tensor([[1, 3]]), 3).tolist() == [[4, 3, 4]]


def test_greedy_acceptance_keeps_the_agreeing_prefix_shared_by_the_batch():
    argmax = torch.tensor([[1, 2, 3, 4], [1, 2, 9, 9]])  # the model's tokens at each verify position
    draft = torch.tensor([[1, 2, 3], [1, 2, 3]])
    active = torch.tensor([True, True])
    logits = torch.zeros(2, 4, 10)
    got = accept(torch.zeros(2, 1, dtype=torch.long), draft, logits, argmax, processors_none(), False, 3, active)
    assert got.tolist() == [[1, 2, 3], [1, 2, 9]]  # row 1 rejects at 2: both keep 2 drafts + the model's token
    # a finished row does not hold the batch back; `limit` caps acceptance (padded drafts)
    got = accept(torch.zeros(2, 1, dtype=torch.long), draft, logits, argmax, processors_none(), False, 3,
                 torch.tensor([True, False]))
    assert got.tolist() == [[1, 2, 3, 4], [1, 2, 9, 9]]
    got = accept(torch.zeros(2, 1, dtype=torch.long), draft, logits, argmax, processors_none(), False, 1, active)
    assert got.tolist() == [[1, 2], [1, 2]]


def processors_none():
    from transformers import LogitsProcessorList

    return LogitsProcessorList()


def test_greedy_with_eos_bans_skips_the_processors_only_where_they_cannot_matter(monkeypatch):
    """min_new_tokens only bans EOS: where the raw argmax is not EOS the runtime takes it without calling the
    vocabulary-sized processors; where it is, the processors run and the runner-up is chosen."""
    from transformers import GenerationConfig, MinNewTokensLengthLogitsProcessor

    eos = 5
    config = GenerationConfig(do_sample=False, min_new_tokens=50, eos_token_id=eos)
    choice = TokenChoice(processors(config, prompt_len=3, eos=[eos]))
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(2, 4, dtype=torch.long)
    logits = torch.randn(2, 10, generator=g)
    logits[1, eos] = 9.0  # row 1's raw argmax is EOS, still banned (1 of 50 new tokens)
    expected = choice.procs(ids, logits.clone()).argmax(-1)
    assert expected[1] != eos and torch.equal(choice.next(ids, logits, logits.argmax(-1)), expected)
    calls = []
    original = MinNewTokensLengthLogitsProcessor.__call__
    monkeypatch.setattr(MinNewTokensLengthLogitsProcessor, "__call__",
                        lambda self, *a: calls.append(1) or original(self, *a))
    logits[1, eos] = -9.0
    assert torch.equal(choice.next(ids, logits, logits.argmax(-1)), logits.argmax(-1)) and not calls
    verify_logits = torch.randn(2, 3, 10, generator=g)
    verify_logits[..., eos] = -9.0
    argmax = verify_logits.argmax(-1)
    draft = argmax[:, :2]
    got = choice.accept(ids, draft, verify_logits, argmax, 2, torch.tensor([True, True]))
    assert torch.equal(got, argmax) and not calls  # both drafts agree: accepted without processor calls
    verify_logits[0, 1, eos] = 9.0  # EOS at a verify position: the processors decide there
    assert torch.equal(choice.accept(ids, draft, verify_logits, verify_logits.argmax(-1), 2, torch.tensor([True, True])),
                       accept(ids, draft, verify_logits, verify_logits.argmax(-1), choice.procs, False, 2,
                              torch.tensor([True, True])))
    assert calls


def test_speculative_sampling_emits_the_models_distribution():
    """First emitted token with a point-mass draft: accepted with p(d), else drawn from p without d; its
    frequency must match p (4-sigma binomial bound per token) for a likely and an unlikely draft."""
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    p = torch.softmax(logits, 0)
    n = 20000
    rows = logits.expand(n, 1, -1).repeat(1, 2, 1).clone()  # [n, 2, V]: verify positions 0 and 1
    for d in (0, 4):
        draft = torch.full((n, 1), d)
        first = torch.stack([accept(torch.zeros(1, 1, dtype=torch.long), draft[i:i + 1], rows[i:i + 1],
                                    rows[i:i + 1].argmax(-1), processors_none(), True, 1,
                                    torch.tensor([True]))[0, 0] for i in range(0, n)])
        freq = torch.bincount(first, minlength=6).double() / n
        bound = 4 * (p.double() * (1 - p.double()) / n).sqrt() + 1e-9
        assert ((freq - p.double()).abs() <= bound).all(), (d, freq, p)


@pytest.mark.parametrize("kind", PROPOSERS)
@pytest.mark.parametrize("build", [tiny_llama, model_zoo.gemma3], ids=["llama", "gemma3-ring"])
def test_greedy_with_a_drafter_is_token_for_token_the_models_own(kind, build):
    """20 prompts at batch 1, eager engine (the compiled step runs the same code); gemma3's window of 8 slots
    makes the ring wrap and roll back across rejected drafts. float64: a random tiny model has near-ties
    (margins of 1e-3) that float32 summation order alone can flip between a 1-token and a k-token forward."""
    model = build().eval().double()
    engine = DecodeEngine(model, _plan(kind), compile=False)
    accepted = 0
    for ids in _repeating_prompts(20):
        got = engine.generate(ids, 24)
        assert torch.equal(got, _forward_greedy(model, ids, 24)), ids
        accepted += engine.last_timing["accepted_drafts"]
    assert accepted > 0, "the prompts repeat: some drafts must have been accepted"


def check_left_padded_batch_of_four(model, engine) -> None:
    """Four left-padded prompts in one call decode each row as transformers decodes that prompt alone, with
    drafts verified on the way."""
    prompts = [p[0] for p in _repeating_prompts(4, seed=3)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(4, width, dtype=torch.long)
    mask = torch.zeros(4, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    got = engine.generate(ids, 20, attention_mask=mask)
    for i, p in enumerate(prompts):
        want = _hf_greedy(model, p[None], 20)[0, len(p):]
        assert torch.equal(got[i, width:], want), i
    assert engine.last_timing["verify_steps"] > 0


@pytest.mark.parametrize("kind", PROPOSERS)
def test_batch_of_four_with_left_padding_matches_per_prompt_runs(kind):
    model = tiny_llama().eval()
    check_left_padded_batch_of_four(model, DecodeEngine(model, _plan(kind), compile=False))


def test_compiled_verify_step_with_int8_weights_matches_plain_decoding():
    from optpass.passes.quantize import QuantizeConfig

    model = optpass.optimize(tiny_llama(), passes=[QuantizeConfig(weights="int8")], quality_budget=None)
    ids = _repeating_prompts(1)[0]
    plain = DecodeEngine(model, DecodePlan(compiled_step=True, max_cache_len=256)).generate(ids, 24)
    engine = DecodeEngine(model, _plan("prompt_lookup"))
    assert torch.equal(engine.generate(ids, 24), plain)
    assert engine.last_timing["verify_steps"] > 0


def test_seeded_sampling_with_a_drafter_reproduces_and_uses_processors():
    model = tiny_llama().eval()
    engine = DecodeEngine(model, _plan("prompt_lookup"), compile=False)
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=True, temperature=0.8, top_k=20, repetition_penalty=1.2)
    ids = _repeating_prompts(1)[0]
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(engine.generate(ids, 24, choice=TokenChoice(processors(config, ids.shape[1], []), True)))
    assert torch.equal(runs[0], runs[1])


def test_speculative_pass_end_to_end_and_its_report():
    model = optpass.optimize(tiny_llama(), passes=["speculative"], quality_budget=None)
    record = next(r for r in model.optpass_report.passes if r.name == "speculative")
    assert record.status == "applied", record
    assert "identical" in record.details["lossless_check"]
    plan = model.optpass_runtime.plan
    assert plan.proposer["kind"] == "prompt_lookup" and plan.proposer["verify_cost"] >= 1.0
    model.optpass_runtime.engine._compile = False
    ids = _repeating_prompts(1)[0]
    assert torch.equal(model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None),
                       _hf_greedy(model, ids, 20))
    assert model.optpass_runtime.engine.last_timing["verify_steps"] > 0


@pytest.mark.parametrize("batch", [1, 4])
def test_drafting_with_a_compressed_cache_is_token_for_token_plain_decoding_on_it(batch):
    """The compressed cache evicts as tokens arrive (12 tokens kept: slots fill and evict from the first steps),
    so rejected drafts are undone by restoring its state and re-running the accepted tokens: the output equals
    decoding on the same compressed cache without a drafter, at batch 1 (20 prompts) and batch 4 left-padded."""
    model = tiny_llama().eval().double()
    kv = asdict(KVSettings(policy="snapkv", keep=12, window=4, sink=2, bits=8))
    drafting = DecodeEngine(model, _plan("prompt_lookup", kv=kv), compile=False)
    plain = DecodeEngine(model, DecodePlan(compiled_step=True, max_cache_len=256, kv=kv), compile=False)
    verifies = accepted = 0
    for ids in _repeating_prompts(20 if batch == 1 else 3, seed=batch):
        mask = None
        if batch > 1:
            ids = ids.repeat(batch, 1)
            ids[1:, :2] = torch.randint(0, 100, (batch - 1, 2))  # rows differ where the drafts come from
            mask = torch.ones_like(ids)
            mask[2, :3] = mask[3, :1] = 0
        got = drafting.generate(ids, 24, attention_mask=mask)
        assert torch.equal(got, plain.generate(ids, 24, attention_mask=mask)), ids
        assert drafting.no_draft_reason == ""
        verifies += drafting.last_timing["verify_steps"]
        accepted += drafting.last_timing["accepted_drafts"]
    assert verifies > 0 and 0 < accepted < 4 * verifies  # drafts accepted, and rejected ones rolled back


@pytest.mark.parametrize("kernel", [True, False], ids=["decode-kernel", "per-query-fallback"])
def test_a_verify_step_computes_each_position_bit_for_bit_as_a_one_token_step(kernel, monkeypatch):
    """Under `decode_steps` each of the k + 1 positions is computed as a one-token step would be (the decode
    kernel's rows are independent; without it, each query attends alone), so its logits equal a one-token step's
    exactly (not just closely): greedy speculation then cannot flip a near-tie that plain decoding would not."""
    from optpass.backends.cpu import decode_attention, gemv_ops
    from optpass.backends.kv import enable_compressed_attention
    from optpass.backends.kv.attention import decode_steps
    from optpass.backends.kv.cache import static_cache
    from optpass.hf_compat import with_cache

    from optpass.passes.quantize import QuantizeConfig

    # int8 weights: optpass's GEMV computes every row alone (per-row activation scale, integer accumulation); an
    # fp32 GEMM blocks M = 1 and M = 6 differently, so a float model could not be bit-exact whatever attention does
    model = optpass.optimize(tiny_llama(layers=3, hidden=128), passes=[QuantizeConfig(weights="int8", lm_head="int8")],
                             quality_budget=None)
    enable_compressed_attention(model)
    if kernel and not gemv_ops.available():
        pytest.skip("optpass C++ kernels not built here")
    calls = []
    real = decode_attention.attend
    monkeypatch.setattr(decode_attention, "attend",
                        lambda *a, **k: calls.append(a[0].shape[2]) or (real(*a, **k) if kernel else None))
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    prompt, tail = ids[:, :24], ids[:, 24:]

    def run(chunks):
        cache = static_cache(model.config, 64)
        mask = torch.zeros(1, 64, dtype=torch.long)
        mask[:, :24] = 1
        with torch.no_grad():
            model(input_ids=prompt, **with_cache(model, cache), use_cache=True)
            out, seen = [], 24
            for chunk in chunks:
                mask[:, seen:seen + chunk.shape[1]] = 1
                positions = torch.arange(seen, seen + chunk.shape[1])[None]
                with decode_steps():
                    out.append(model(input_ids=chunk, **with_cache(model, cache), attention_mask=mask,
                                     position_ids=positions, use_cache=True).logits)
                seen += chunk.shape[1]
        return torch.cat(out, dim=1)

    one_at_a_time = run(list(tail.split(1, dim=1)))
    verified = run([tail])
    assert torch.equal(verified, one_at_a_time)
    assert sorted(set(calls)) == [1, 6]  # both kinds of step went through the kernel's entry point


def _drive(gate, steps: int, emitted: int, plain_s: float = 1.0, verify_s: float = 2.0) -> list[bool]:
    """Run `gate` for `steps` loop iterations where a verify emits `emitted` tokens; the decisions taken."""
    wants = []
    for _ in range(steps):
        want = gate.want()
        wants.append(want)
        gate.record_verify(verify_s, emitted) if want else gate.record_plain(plain_s)
    return wants


def test_gate_turns_drafting_off_where_it_does_not_pay_and_backs_off_its_probes():
    from optpass.backends.runtime.gate import DraftGate

    gate = DraftGate(ratio=1.5, probe=8, max_probe=64)
    wants = _drive(gate, 200, emitted=1)  # a verify costs 2 steps and yields 1 token: never pays
    assert wants[:2] == [True, True]  # the first drafts are tried
    probes = [i for i, w in enumerate(wants) if w][2:]
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert gaps[:3] == [16, 32, 64] and set(gaps[3:]) <= {64}  # each probe that does not pay doubles the wait
    assert sum(wants) / len(wants) < 0.05


def test_gate_keeps_drafting_while_it_pays_and_resumes_when_acceptance_returns():
    from optpass.backends.runtime.gate import DraftGate

    gate = DraftGate(ratio=1.5)
    assert all(_drive(gate, 50, emitted=4))  # 4 tokens per verify at 2 steps' cost
    off = _drive(gate, 40, emitted=1)
    assert sum(off[15:]) <= 2  # off within ~10 verifies of the drop (an EMA), then only probes
    on = _drive(gate, 60, emitted=6)  # a stretch that copies its input: the next probe turns it back on
    assert all(on[-30:])


def test_engine_starts_a_batch_size_whose_verify_measured_too_costly_with_drafting_off():
    """The plan's verify cost is a batch-1 estimate. At batch 4 a verify has one draft (8 rows); once a call
    measured it at >= 2 one-token steps, full acceptance cannot pay, so later calls at that batch start with
    drafting off and only probe (a stale figure costs a probe), while batch 1 still drafts from the start."""
    model = tiny_llama().eval()
    engine = DecodeEngine(model, _plan("prompt_lookup"), compile=False)
    batch = _repeating_prompts(1, batch=4, seed=3)[0]
    engine.generate(batch, 12)  # makes the steps (their first calls are not timed)
    engine.generate(batch, 12)
    first = engine.last_timing["verify_steps"]
    assert first > 0 and (4, "prompt_lookup") in engine.verify_cost_seen
    engine.verify_cost_seen[4, "prompt_lookup"] = 2.3  # as a slow verify would have measured
    # whether the second call's gate ended off (and how long it had waited) follows its timings: start from none
    engine.gate_waited[4, "prompt_lookup"] = 0
    again = engine.generate(batch, 12)
    # started off with no wait carried over: the whole call is plain (the first probe comes after 128 steps)
    assert engine.last_timing["verify_steps"] == 0 < first
    assert torch.equal(again, engine.generate(batch, 12, speculate=False))
    assert engine.gate_waited[4, "prompt_lookup"] == 10  # the steps this call waited (not the last: nothing left to draft)
    engine.generate(batch[:1], 12)
    assert engine.last_timing["verify_steps"] > 0 and engine.no_draft_reason == ""


def test_gate_started_off_only_probes():
    from optpass.backends.runtime.gate import DraftGate

    wants = _drive(DraftGate(ratio=2.5, start_off=True, probe=8, max_probe=32), 40, emitted=2, verify_s=2.5)
    # no first tries, and the first probe only after the longest interval: it can only re-measure the cost
    assert not any(wants[:31]) and wants[31]
    # the wait carries over from earlier calls (the engine keeps it per batch size): short calls still probe
    carried = _drive(DraftGate(ratio=2.5, start_off=True, probe=8, max_probe=32, waited=30), 4, emitted=2)
    assert carried[:2] == [False, True]


def test_gate_does_not_time_a_step_whose_graph_is_made_on_that_call(monkeypatch):
    """A step's first call compiles (minutes on a real model); timed, it would make drafting look ruinous for
    the rest of the call and start the next call at that batch off."""
    from optpass.backends.runtime import engine as engine_module
    from optpass.backends.runtime.gate import DraftGate

    timed: list[float] = []

    class RecordingGate(DraftGate):
        def record_plain(self, seconds: float) -> None:
            timed.append(seconds)
            super().record_plain(seconds)

        def record_verify(self, seconds: float, emitted: int) -> None:
            timed.append(seconds)
            super().record_verify(seconds, emitted)

    monkeypatch.setattr(engine_module, "DraftGate", RecordingGate)
    model = tiny_llama().eval()
    engine = DecodeEngine(model, _plan("prompt_lookup"), compile=False)
    engine.generate(_repeating_prompts(1, seed=5)[0], 24)
    iterations = engine.last_timing["decode_steps"] - engine.last_timing["accepted_drafts"]
    # every loop iteration is timed but the first plain step and the first verify step (their graphs' first calls)
    assert engine.last_timing["verify_steps"] > 1 and len(timed) == iterations - 2
    timed.clear()
    engine.generate(_repeating_prompts(1, seed=5)[0], 24)  # the steps exist now: every iteration is timed
    assert len(timed) == engine.last_timing["decode_steps"] - engine.last_timing["accepted_drafts"]
