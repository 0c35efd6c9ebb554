"""The decode runtime: one wrapper of generate(), greedy identical to transformers, sampling with transformers'
own processed distribution and reproducible seeds, left-padded batches, fallbacks that say why, weights
changed after compiling."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from transformers import GenerationConfig

from optpass.backends.runtime import DecodeEngine, DecodePlan, install_runtime
from optpass.backends.runtime import sampler
from optpass.models import tiny_llama
from tests import model_zoo

COMPILED = DecodePlan(compiled_step=True, max_cache_len=64)


def _runtime_model(plan: DecodePlan = COMPILED, compile: bool = False, build=tiny_llama):
    model = build()
    install_runtime(model, plan)
    model.optpass_runtime.engine._compile = compile
    return model


def _hf(model, *args, **kwargs):
    return type(model).generate(model, *args, **kwargs)


def test_greedy_is_transformers_greedy_eager_and_compiled():
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    for compiled in (False, True):
        model = _runtime_model(compile=compiled)
        want = _hf(model, ids, max_new_tokens=9, do_sample=False, eos_token_id=None)
        got = model.generate(ids, max_new_tokens=9, do_sample=False, eos_token_id=None)
        assert torch.equal(got, want), f"compiled={compiled}"
        assert model.optpass_runtime.fast_calls == 1 and not model.optpass_runtime.fallbacks


def test_two_compiled_engines_do_not_share_graphs():
    """Guards are skipped on the hot loop, so each engine's step must compile on its own."""
    ids = torch.randint(0, 256, (1, 5))
    for seed in (1, 2):
        model = tiny_llama(seed=seed)
        got = DecodeEngine(model, COMPILED).generate(ids, 6)
        assert torch.equal(got, model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None))


def test_eos_lists_min_new_tokens_and_padding_follow_transformers():
    model = _runtime_model()
    ids = torch.randint(0, 256, (3, 6), generator=torch.Generator().manual_seed(4))
    first = _hf(model, ids, max_new_tokens=3, do_sample=False, eos_token_id=None)[:, 6:]
    eos = [int(first[0, 0]), int(first[1, 2])]  # row 0 ends at once, row 1 at its third token
    for kwargs in ({"eos_token_id": eos, "pad_token_id": 7}, {"eos_token_id": eos, "min_new_tokens": 4, "pad_token_id": 7},
                   {"eos_token_id": eos[0]}):
        want = _hf(model, ids, max_new_tokens=8, do_sample=False, **kwargs)
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, **kwargs), want), kwargs


def test_processed_distribution_is_transformers():
    """For the same logits, the runtime's processors give exactly the scores generate() computes."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    ids, logits = torch.randint(0, 256, (2, 9), generator=g), torch.randn(2, 256, generator=g) * 3
    for fields in ({"temperature": 0.7, "top_p": 0.9}, {"top_k": 20, "temperature": 1.3}, {"min_p": 0.05},
                   {"repetition_penalty": 1.3, "top_p": 0.8, "top_k": 50}, {"min_new_tokens": 5}):
        config = GenerationConfig(do_sample="min_new_tokens" not in fields, eos_token_id=3, **fields)
        config._eos_token_tensor = torch.tensor([3])
        reference = model._get_logits_processor(config, input_ids_seq_length=6)
        ours = sampler.processors(config, prompt_len=6, eos=[3])
        torch.testing.assert_close(ours(ids, logits.clone()), reference(ids, logits.clone()))


def test_seeded_sampling_reproduces_and_stays_on_the_fast_path():
    model = _runtime_model()
    ids = torch.randint(0, 256, (1, 6))
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(model.generate(ids, max_new_tokens=12, do_sample=True, temperature=0.7, top_p=0.9))
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(124)
    assert not torch.equal(runs[0], model.generate(ids, max_new_tokens=12, do_sample=True, temperature=0.7, top_p=0.9))
    assert model.optpass_runtime.fast_calls == 3 and not model.optpass_runtime.fallbacks
    torch.manual_seed(5)
    out = model.generate(ids, max_new_tokens=4, do_sample=True, num_return_sequences=3)
    assert out.shape == (3, 10) and torch.equal(out[:, :6], ids.expand(3, 6))


def test_generation_config_on_the_model_is_honoured():
    model = _runtime_model()
    model.generation_config.do_sample, model.generation_config.top_k = True, 5
    ids = torch.randint(0, 256, (1, 6))
    torch.manual_seed(0)
    a = model.generate(ids, max_new_tokens=10)
    torch.manual_seed(0)
    b = model.generate(ids, max_new_tokens=10)
    greedy = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(a, b) and not torch.equal(a, greedy), "the model's sampling config was applied"


@pytest.mark.parametrize("build", [tiny_llama, model_zoo.gemma3])
def test_left_padded_batch_matches_per_prompt_runs(build):
    model = _runtime_model(build=build)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 100, (n,), generator=g) for n in (5, 9, 3, 12)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(4, width, dtype=torch.long)
    mask = torch.zeros(4, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert model.optpass_runtime.fast_calls == 1, model.optpass_runtime.fallbacks
    for i, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=10, do_sample=False, eos_token_id=None)
        assert out[i, width:].tolist() == single[0, len(p):].tolist()


def test_left_padded_batch_with_a_compressed_cache():
    from optpass.backends.kv import KVSettings

    plan = DecodePlan(compiled_step=True, kv=asdict(KVSettings(policy="snapkv", keep=64, bits=8)))
    model = _runtime_model(plan)
    prompts = [torch.randint(1, 100, (n,), generator=torch.Generator().manual_seed(n)) for n in (40, 70)]
    ids = torch.zeros(2, 70, dtype=torch.long)
    mask = torch.zeros(2, 70, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 70 - len(p):], mask[i, 70 - len(p):] = p, 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
    for i, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=8, do_sample=False, eos_token_id=None)
        assert out[i, 70:].tolist() == single[0, len(p):].tolist()


def test_unsupported_calls_fall_back_with_a_reason_once():
    model = _runtime_model()
    ids = torch.randint(0, 256, (1, 6))
    with pytest.warns(UserWarning, match="num_beams"):
        got = model.generate(ids, max_new_tokens=5, num_beams=2, do_sample=False)
    assert torch.equal(got, _hf(model, ids, max_new_tokens=5, num_beams=2, do_sample=False))
    model.generate(ids, max_new_tokens=5, num_beams=2, do_sample=False)  # counted, not warned again
    reason = next(iter(model.optpass_runtime.fallbacks))
    assert "num_beams" in reason and model.optpass_runtime.fallbacks[reason] == 2
    with pytest.warns(UserWarning, match="right padding"):
        model.generate(ids, attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0]]), max_new_tokens=3)


def test_weights_changed_after_compiling_are_used():
    model = _runtime_model(compile=True)
    ids = torch.randint(0, 256, (1, 5))
    before = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        g = model.model.norm.weight  # random per-channel gains: the tiny model stops repeating its input
        g.mul_(torch.randn(g.shape, generator=torch.Generator().manual_seed(1)) * 4)
    with pytest.warns(UserWarning, match="weights changed"):
        after = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(after, _hf(model, ids, max_new_tokens=6, do_sample=False, eos_token_id=None))
    assert not torch.equal(after, before)


@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])
def test_nucleus_without_a_full_sort_keeps_transformers_set(scale):
    """On a 49k vocabulary (the top-k prefilter has to widen for flat logits) the kept set and the renormalized
    distribution equal transformers' sort-based TopPLogitsWarper; the draw picks only kept tokens."""
    from transformers import TopPLogitsWarper

    logits = torch.randn(3, 49152, generator=torch.Generator().manual_seed(7)) * scale
    for top_p in (0.5, 0.9, 0.99):
        ref = TopPLogitsWarper(top_p)(None, logits.clone())
        got = sampler.NucleusByTopK(top_p)(None, logits.clone())
        assert torch.equal(torch.isfinite(got), torch.isfinite(ref))
        torch.testing.assert_close(torch.softmax(got, -1), torch.softmax(ref, -1))
        torch.manual_seed(0)
        picks = torch.stack([sampler.draw(got) for _ in range(20)])
        assert bool(torch.isfinite(got.gather(1, picks.T)).all())


@pytest.mark.parametrize("fields", [{"temperature": 0.7, "top_p": 0.9}, {"top_k": 40, "temperature": 1.3},
                                    {"min_p": 0.05}, {"temperature": 0.8, "top_k": 300, "top_p": 0.95, "min_p": 0.02},
                                    {"top_p": 0.999}])
def test_sampling_among_top_candidates_is_transformers_distribution(fields):
    """The draw's fast path (warpers computed on a top-k slice, `warped_candidates`) gives the distribution of
    generate()'s own warpers on a 49k vocabulary, flat and peaked logits alike; its draws are kept tokens."""
    model = tiny_llama()
    config = GenerationConfig(do_sample=True, **fields)
    reference = model._get_logits_processor(config, input_ids_seq_length=6)
    ours = sampler.processors(config, prompt_len=6, eos=[])
    before, warpers = sampler.split_warpers(ours)
    assert not len(before) and warpers
    for scale in (0.3, 3.0, 12.0):
        logits = torch.randn(3, 49152, generator=torch.Generator().manual_seed(11)) * scale
        want = torch.softmax(reference(None, logits.clone()), -1)
        index, kept = sampler.warped_candidates(logits.clone(), warpers)
        got = torch.zeros_like(want).scatter_(1, index, torch.softmax(kept, -1))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
        torch.manual_seed(0)
        picks = torch.stack([sampler.choose(None, logits, ours, True) for _ in range(20)])
        assert bool((want.gather(1, picks.T) > 0).all())


def test_draw_follows_the_distribution():
    scores = torch.full((1, 4096), float("-inf"))
    scores[0, [3, 100, 2000]] = torch.tensor([0.0, 1.0, 2.0])
    torch.manual_seed(0)
    counts = torch.bincount(torch.cat([sampler.draw(scores) for _ in range(6000)]), minlength=4096)
    p = torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0)
    assert counts.sum() == counts[[3, 100, 2000]].sum()
    sigma = (6000 * p * (1 - p)).sqrt()  # binomial spread of each count
    assert bool(((counts[[3, 100, 2000]].float() - 6000 * p).abs() < 4 * sigma).all()), counts[[3, 100, 2000]]


def test_a_fresh_process_compiles_the_step_of_a_model_with_sliding_layers():
    """The decode kernels load on first use, which must not happen inside the step's trace (their progress line
    calls time.perf_counter, which dynamo refuses): a model with sliding-window layers skipped the early load."""
    import subprocess
    import sys
    from pathlib import Path

    script = ("import torch\nfrom tests import model_zoo\nfrom optpass.backends.runtime import DecodeEngine, DecodePlan\n"
              "m = model_zoo.gemma3().eval()\n"
              "e = DecodeEngine(m, DecodePlan(compiled_step=True, max_cache_len=256))\n"
              "print(tuple(e.generate(torch.randint(0, 100, (1, 12)), 4).shape))\n")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "(1, 16)" in done.stdout, done.stderr[-2000:]
