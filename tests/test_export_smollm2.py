"""The exports of SmolLM2-135M int4 g32 blocks + int8 head (real weights and tokenizer): the GGUF's tokenizer
metadata, llama.cpp's tokenization and greedy tokens against optpass's, and stock transformers on the
compressed-tensors directory against optpass's generation logits. `benchmarks/export_agreement.py` measures
the same at length."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

import optpass
from tests.export_helpers import TRANSFORMERS_LOGITS as LOGITS, quantize_as

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_int4(smollm2):
    """optpass's int4 g32 + int8 head modules swapped in directly (what `optimize()` picks for SmolLM2, without
    its measurements)."""
    model, tokenizer = smollm2
    return quantize_as(copy.deepcopy(model), {"proj": ("int4", 32), "lm_head": ("int8", 0)}), tokenizer


@pytest.fixture(scope="module")
def smol_gguf(smol_int4, tmp_path_factory):
    model, tokenizer = smol_int4
    return optpass.save(model, tmp_path_factory.mktemp("gguf") / "smol.gguf", format="gguf", tokenizer=tokenizer)


def _prompt(tokenizer) -> list[int]:
    from optpass.corpus import token_windows

    return token_windows(tokenizer, 64, 1)[0].tolist()  # the benchmark prompt: the corpus' first 64 tokens


def test_gguf_tokenizer_metadata(smol_int4, smol_gguf):
    _, tokenizer = smol_int4
    fields = gguf.GGUFReader(str(smol_gguf)).fields
    value = (lambda key: fields[key].contents())
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "smollm"
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == 49152 and tokens[tokenizer.convert_tokens_to_ids("Ġthe")] == "Ġthe"
    assert value("tokenizer.ggml.token_type")[:17] == [3] * 17  # the added special tokens are CONTROL
    assert len(value("tokenizer.ggml.merges")) == 48900
    assert (value("tokenizer.ggml.bos_token_id"), value("tokenizer.ggml.eos_token_id")) == (1, 2)
    assert value("tokenizer.ggml.add_bos_token") is False  # SmolLM2's tokenizer adds no bos
    assert value("tokenizer.chat_template") == tokenizer.chat_template
    state = json.loads(value("optpass.state"))
    assert state["export"]["tensor_types"] == {"Q8_0": 2, "F32": 61, "Q4_1": 210}  # embedding: exact Q8_0 re-pack


def test_llama_cpp_tokenizes_and_decodes_like_optpass(smol_int4, smol_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    from optpass.corpus import corpus_text

    model, tokenizer = smol_int4
    llm = llama_cpp.Llama(model_path=str(smol_gguf), n_ctx=256, n_threads=2, verbose=False)
    text = corpus_text()[5000:7000]
    assert llm.tokenize(text.encode(), add_bos=False) == tokenizer(text, add_special_tokens=False).input_ids
    prompt, n = _prompt(tokenizer), 32
    ours = type(model).generate(model, input_ids=torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False)[0, len(prompt):].tolist()
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        theirs.append(token)
        if len(theirs) == n:
            break
    assert sum(a == b for a, b in zip(ours, theirs)) >= 30


def test_fp32_gguf_in_llama_cpp_gives_transformers_logits(smollm2, tmp_path):
    """The mapping alone (names, q / k row order, metadata): the fp32 model as F32 tensors, run by llama.cpp with
    an F32 KV cache, computes transformers' logits (the quantized files differ by llama.cpp's arithmetic only)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    from optpass.corpus import token_windows

    model, tokenizer = smollm2
    path = optpass.save(model, tmp_path / "f32.gguf", format="gguf", tokenizer=tokenizer, float_matrices="F32")
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, n_threads=2, verbose=False,
                          type_k=0, type_v=0)
    ids = token_windows(tokenizer, 64, 1, offset_windows=64)[0]
    llm.eval(ids.tolist())
    theirs = torch.from_numpy(np.array(llm.scores[:64], dtype=np.float32))
    with torch.no_grad():
        ours = model(input_ids=ids[None]).logits[0]
    assert float((theirs - ours).abs().max()) < 1e-3


def test_transformers_on_the_compressed_tensors_export_agrees_with_optpass(smol_int4, tmp_path):
    """Both int4 encodings in stock transformers (a subprocess without optpass). "float-zero" holds optpass's int4
    weights exactly, so transformers computes what optpass's fp32 twin (the same dequantized weights, fp32
    activations) computes: top-1 equal, KL ~0. Against optpass's generation logits it agrees ~99% (optpass
    decodes with bf16 activations; 2 x 128 tokens make that figure move by 0.4% a token, so it is not the bar).
    W8A16 (what vLLM serves) re-quantizes the int4 weights to int8: >= 98% top-1 against optpass's generation."""
    pytest.importorskip("compressed_tensors")
    from optpass.corpus import token_windows
    from optpass.export.candidates import float_twin
    from optpass.quality import logits_kl, stepwise_logits, top1_agreement

    model, tokenizer = smol_int4
    windows = token_windows(tokenizer, 128, 2, offset_windows=32)  # past optimize()'s verify / calibration slices
    torch.save(windows, tmp_path / "ids.pt")
    with torch.no_grad():
        generation = [stepwise_logits(model, w[None]) for w in windows]
        twin = float_twin(model, lambda lw: lw.dequantized())
        exact = [twin(input_ids=w[None]).logits for w in windows]
        del twin
    for encoding, ours, bar, schemes in (("float-zero", exact, 0.996, {(4, "block"), (8, "channel")}),
                                         ("w8a16", generation, 0.98, {(8, "group"), (8, "channel")})):
        out = optpass.save(model, tmp_path / encoding, format="compressed-tensors", tokenizer=tokenizer, int4=encoding)
        run = subprocess.run([sys.executable, "-c", LOGITS, str(out), str(tmp_path / "ids.pt"),
                              str(tmp_path / f"{encoding}.pt")], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        theirs = torch.load(tmp_path / f"{encoding}.pt")
        agreement = [top1_agreement(o, t.reshape(o.shape)) for o, t in zip(ours, theirs)]
        assert sum(agreement) / len(agreement) >= bar, (encoding, agreement)
        if encoding == "float-zero":
            assert max(logits_kl(o, t.reshape(o.shape)) for o, t in zip(ours, theirs)) < 1e-3
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert {(g["weights"]["num_bits"], g["weights"]["strategy"]) for g in qc["config_groups"].values()} == schemes
