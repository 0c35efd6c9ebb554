"""Block-by-block quantization of Hugging Face Llama directories (`optpass/streaming/`): the written checkpoint
against the in-memory quantize pass, the memory bound, refusals, the CLI and the automatic switch."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import optpass
from optpass.backends.cpu.quant_linear import Int4Linear, Int8Linear
from optpass.checkpoint import STATE_FILE, WEIGHTS_FILE
from optpass.errors import ConfigError, UnsupportedModelError
from optpass.passes.quantize import QuantizeConfig, quantized_modules
from optpass.streaming import StreamingResult, quantize_streaming
from optpass.streaming.writer import SafetensorsWriter, TensorSpec

LOOSE = "ppl:50%,kl:1"  # random weights: the budget must not roll the in-memory reference back


def _llama_dir(path, tied: bool = True, dtype: torch.dtype = torch.float32, shard: str | None = None, **dims):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512), **dims},
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval().to(dtype)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


def _random_shards(path, shards: int, **dims):
    """A random untied Llama written straight to `shards` safetensors files + index (no module init: quick)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from optpass.streaming.llama import skeleton

    config = LlamaConfig(**dims, tie_word_embeddings=False)
    path.mkdir(parents=True)
    config.save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    names = list(skeleton(config).state_dict().items())
    weight_map, per = {}, -(-len(names) // shards)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # elementwise fills: one thread is as fast and immune to a busy machine
    try:
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: (torch.ones(t.shape) if "norm" in n else torch.randn(t.shape, generator=g) * 0.02)
                    for n, t in names[i * per:(i + 1) * per]}
            save_file(part, str(path / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
    finally:
        torch.set_num_threads(threads)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


CASES = {
    # tied head quantized int8 (the config must drop the tie), plain int4 blocks, one safetensors file
    "tied-int8-head": (dict(tied=True), QuantizeConfig(weights="int4", lm_head="int8")),
    # untied bf16 shards (index json), AWQ on the blocks and on an int4 head, group size 64
    "untied-bf16-sharded-awq": (dict(tied=False, dtype=torch.bfloat16, shard="40KB"),
                                QuantizeConfig(weights="int4", lm_head="int4", awq=True, group_size=64)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_checkpoint_equals_in_memory_quantize(tmp_path, case):
    """Same config, two independent paths: the fx-captured whole-model pass vs meta skeleton + one block at a time."""
    dims, cfg = CASES[case]
    src = _llama_dir(tmp_path / "hf", **dims)
    if "shard" in dims:
        assert (src / "model.safetensors.index.json").exists()
    result = optpass.optimize(str(src), passes=[cfg], streaming=True, output=str(tmp_path / "out"), quality_budget=LOOSE)
    assert isinstance(result, StreamingResult) and result.report.applied == ["quantize"]
    loaded = optpass.load(result.path)
    reference = optpass.optimize(str(src), passes=[cfg], quality_budget=LOOSE)
    assert reference.optpass_report.applied == ["quantize"]

    assert isinstance(loaded.model.layers[1].mlp.down_proj, Int4Linear)
    assert isinstance(loaded.lm_head, Int8Linear if cfg.lm_head == "int8" else Int4Linear)
    state = json.loads((result.path / STATE_FILE).read_text())
    assert state["passes"][0]["state"]["modules"] == quantized_modules(reference)
    assert state["runtime"]["compiled_step"] and loaded.optpass_runtime.plan.compiled_step
    mine, theirs = loaded.state_dict(), reference.state_dict()
    assert set(mine) == set(theirs)
    differ = [k for k in mine if not torch.equal(mine[k], theirs[k])]
    assert not differ, f"tensors differ from the in-memory pass: {differ[:5]}"
    if cfg.awq:
        awq = result.report.passes[0].details["awq"]
        ref_awq = reference.optpass_report.passes[0].details["awq blocks int4 g64"]
        assert awq["unscaled"] == ref_awq["unscaled"] and awq["groups"] == ref_awq["groups"] + 1  # + the head's
        assert any(a > 0 for a in awq["alphas"].values())  # scales were actually folded, not all alpha = 0
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    # the after-the-fact check scores the same verification windows the in-memory guard scored
    assert result.report.passes[0].details["streaming"]["checked_load"]
    guard = reference.optpass_report.passes[0].quality
    for key in ("kl", "top1", "ppl_increase"):
        assert result.report.quality_final[key] == pytest.approx(guard[key], rel=1e-3, abs=1e-6), key


def test_tied_kept_head_is_an_alias_and_skip_stays_float(tmp_path):
    src = _llama_dir(tmp_path / "hf", tied=True)
    cfg = QuantizeConfig(weights="int8_grouped", lm_head="keep", skip=("model.layers.0.mlp",))
    result = quantize_streaming(src, tmp_path / "out", cfg, check_load=True)
    state = json.loads((result.path / STATE_FILE).read_text())
    assert state["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    stored = load_file(str(result.path / WEIGHTS_FILE))
    assert "model.layers.0.mlp.down_proj.weight" in stored and "model.layers.1.mlp.down_proj.qweight" in stored
    assert stored["model.layers.1.mlp.down_proj.scale"].shape == (64, 128 // 32)  # int8 per group of 32
    loaded = result.load()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert result.report.passes[0].details["streaming"]["logits_max_abs_diff"] < 1e-4


def test_non_llama_checkpoint_is_refused_with_its_architecture(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "qwen")
    with pytest.raises(UnsupportedModelError, match=r"qwen2.*Qwen2ForCausalLM"):
        optpass.optimize(str(tmp_path / "qwen"), passes=["quantize"], streaming=True, output=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_streaming_refuses_other_passes_and_w8a8(tmp_path):
    src = _llama_dir(tmp_path / "hf")
    with pytest.raises(ConfigError, match="only the quantize pass"):
        optpass.optimize(str(src), passes="auto", streaming=True)
    with pytest.raises(ConfigError, match="W8A8"):
        quantize_streaming(src, tmp_path / "out", QuantizeConfig(w8a8=True))
    with pytest.raises(ConfigError, match="checkpoint directory"):
        optpass.optimize(torch.nn.Linear(2, 2), passes=["quantize"], streaming=True)


def test_too_big_for_memory_streams_automatically(tmp_path, monkeypatch):
    import optpass.streaming.memory as memory

    src = _llama_dir(tmp_path / "hf")
    monkeypatch.setattr(memory, "available_memory", lambda: 1000)  # bytes: nothing fits
    with pytest.warns(UserWarning, match="quantizing block by block"):
        result = optpass.optimize(str(src), passes=["quantize"], output=str(tmp_path / "out"))
    assert isinstance(result, StreamingResult) and result.report.notes[0].startswith("streamed automatically")
    assert optpass.load(result.path).model.layers[0].self_attn.q_proj.__class__ is Int4Linear  # auto = int4 blocks
    with pytest.raises(ConfigError, match="only the quantize pass"):
        optpass.optimize(str(src), passes="auto")


def test_cli_streaming_writes_a_loadable_checkpoint(tmp_path, capsys):
    from optpass.cli import main

    src = _llama_dir(tmp_path / "hf")
    out = tmp_path / "out"
    assert main(["optimize", str(src), "--passes", "quantize", "--streaming", "-o", str(out),
                 "--quality-budget", LOOSE, "--report-json", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    assert "streaming" in text and f"wrote {out}" in text
    assert json.loads((tmp_path / "r.json").read_text())["passes"][0]["status"] == "applied"
    assert isinstance(optpass.load(out).lm_head, Int8Linear)  # "auto" head = int8 here
    assert main(["optimize", str(tmp_path / "r.json"), "--streaming"]) == 2  # not a checkpoint directory


def test_writer_checks_order_shapes_and_completeness(tmp_path):
    specs = [TensorSpec("a", torch.float32, (2, 3)), TensorSpec("b", torch.uint8, (5,))]
    w = SafetensorsWriter(tmp_path / "x.safetensors", specs, metadata={"format": "t"})
    with pytest.raises(ValueError, match="expected a next"):
        w.write("b", torch.zeros(5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="declared"):
        w.write("a", torch.zeros(3, 2))
    a = torch.randn(2, 3)
    w.write("a", a)
    w.write("b", torch.arange(5, dtype=torch.uint8))
    w.close()
    got = load_file(str(tmp_path / "x.safetensors"))
    assert torch.equal(got["a"], a) and got["b"].tolist() == [0, 1, 2, 3, 4]
    w2 = SafetensorsWriter(tmp_path / "y.safetensors", specs)
    w2.write("a", a)
    with pytest.raises(ValueError, match="never written"):
        w2.close()
    assert not (tmp_path / "y.safetensors").exists()


def _rss(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _peak_growth(fn) -> int:
    """Peak RSS growth over the current RSS while `fn` runs: freed heap handed back first (`malloc_trim`), so
    reusing memory an earlier test freed still shows up, then VmHWM reset through /proc/self/clear_refs."""
    from optpass.streaming.memory import release_freed

    release_freed()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss("VmRSS:")
    fn()
    return _rss("VmHWM:") - base


def test_peak_memory_stays_far_below_the_fp32_model(tmp_path):
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs /proc/self/clear_refs (Linux) to reset the peak RSS")
    from transformers import AutoModelForCausalLM

    dims = dict(vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=8,
                num_key_value_heads=8)
    src = _random_shards(tmp_path / "big", shards=4, **dims)
    fp32 = sum(t.numel() * 4 for f in src.glob("*.safetensors") for t in load_file(str(f)).values())
    assert fp32 > 140e6 and (src / "model.safetensors.index.json").exists()
    cfg = QuantizeConfig(weights="int4", lm_head="int8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # memory is measured, not speed: one thread stays quick on a busy machine
    try:
        # lazy imports and kernel builds are paid before measuring
        quantize_streaming(_llama_dir(tmp_path / "tiny"), tmp_path / "warm", cfg, check_load=False)
        streamed = _peak_growth(lambda: quantize_streaming(src, tmp_path / "out", cfg, check_load=False,
                                                                 quality_budget=LOOSE))
        held = []

        def whole() -> None:  # loaded and used once (transformers maps the shards: pages count once touched)
            held.append(AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32))
            with torch.no_grad():
                held[0](input_ids=torch.zeros(1, 4, dtype=torch.long))

        whole_model = _peak_growth(whole)
        held.clear()
    finally:
        torch.set_num_threads(threads)
    # the whole model costs at least its fp32 weights: the measurement sees them, so the bound below can fail
    assert whole_model > 0.9 * fp32, (whole_model, fp32)
    print(f"peak RSS growth: streamed {streamed / 1e6:.0f} MB, whole {whole_model / 1e6:.0f} MB, fp32 {fp32 / 1e6:.0f} MB")
    assert streamed < 0.3 * fp32, f"streamed peak +{streamed / 1e6:.0f} MB vs fp32 {fp32 / 1e6:.0f} MB"
    assert optpass.load(tmp_path / "out").model.layers[11].mlp.up_proj.__class__ is Int4Linear
