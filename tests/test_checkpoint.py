"""optpass.save / optpass.load: round trips (same outputs, same greedy tokens) and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import optpass
from optpass.backends.cpu.quant_linear import Int4Linear, Int8Linear
from optpass.checkpoint import STATE_FILE, WEIGHTS_FILE, _sha256
from optpass.errors import CheckpointError
from optpass.passes.dead_code import DeadCodeConfig
from optpass.passes.quantize import QuantizeConfig


def _greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """HF's own greedy loop (the class method, bypassing the compiled fast path) for exact comparisons."""
    with torch.inference_mode():
        return type(model).generate(model, input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from optpass.models import tiny_llama

    model = optpass.optimize(tiny_llama(), passes=[QuantizeConfig(weights="int4", lm_head="int8")])
    out = optpass.save(model, tmp_path_factory.mktemp("ckpt") / "tiny")
    return model, out


def _edit_state(path, fn) -> None:
    state = json.loads((path / STATE_FILE).read_text())
    fn(state)
    (path / STATE_FILE).write_text(json.dumps(state))


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tiny_round_trip_same_outputs_and_layout(tiny_ckpt):
    model, out = tiny_ckpt
    loaded = optpass.load(out)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, Int4Linear)
    assert isinstance(loaded.lm_head, Int8Linear)
    assert loaded.optpass_runtime.plan.compiled_step  # the decode runtime the checkpoint records
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    assert torch.equal(_greedy(loaded, ids[:1], 8), _greedy(model, ids[:1], 8))
    state = loaded.optpass_checkpoint
    assert [p["name"] for p in state["passes"]] == ["quantize"]
    assert state["passes"][0]["config"]["version"] == QuantizeConfig.version
    assert state["target"] == "cpu" and state["torch_version"] == torch.__version__
    stored = load_file(str(out / WEIGHTS_FILE))
    assert stored["lm_head.qweight"].dtype == torch.int8  # canonical packed integers, not kernel layouts
    assert stored["model.layers.0.mlp.down_proj.qweight"].dtype == torch.uint8
    assert not any("kernel" in k for k in stored)


def test_plain_tied_model_and_dead_code_round_trip(tmp_path, tiny_dit):
    from optpass.models import tiny_dit_inputs

    model = optpass.optimize(tiny_dit, passes=[DeadCodeConfig(), QuantizeConfig(weights="int8", lm_head="int8")])
    loaded = optpass.load(optpass.save(model, tmp_path / "dit"))
    assert [p["name"] for p in loaded.optpass_checkpoint["passes"]] == model.optpass_report.applied
    inputs = tiny_dit_inputs(tiny_dit)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).sample, model(**inputs).sample, atol=0, rtol=0)
    n_identity = sum(isinstance(m, torch.nn.Identity) for m in model.modules())
    assert sum(isinstance(m, torch.nn.Identity) for m in loaded.modules()) == n_identity


def test_unoptimized_tied_llama_round_trip(tmp_path, tiny_llama):
    loaded = optpass.load(optpass.save(tiny_llama, tmp_path / "plain"))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, tiny_llama(input_ids=ids).logits, atol=0, rtol=0)


def test_truncated_weights_is_a_clear_error(tiny_ckpt, tmp_path):
    bad = _copy(tiny_ckpt[1], tmp_path / "trunc")
    data = (bad / WEIGHTS_FILE).read_bytes()
    (bad / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE}: content hash mismatch"):
        optpass.load(bad)
    _edit_state(bad, lambda s: s["weights"][WEIGHTS_FILE].update(sha256=_sha256(bad / WEIGHTS_FILE)))
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE}: cannot parse safetensors"):
        optpass.load(bad)
    (bad / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_FILE}: weight file is missing"):
        optpass.load(bad)


def test_newer_format_version_is_a_clear_error(tiny_ckpt, tmp_path):
    bad = _copy(tiny_ckpt[1], tmp_path / "newer")
    _edit_state(bad, lambda s: s.update(format_version=99, optpass_version="9.0"))
    with pytest.raises(CheckpointError, match=r"optpass_state.json: format_version 99 was written by a newer optpass"):
        optpass.load(bad)
    bad2 = _copy(tiny_ckpt[1], tmp_path / "newer_cfg")
    _edit_state(bad2, lambda s: s["passes"][0]["config"].update(version=99))
    with pytest.raises(CheckpointError, match=r"pass 'quantize' config: QuantizeConfig: config version 99 is newer"):
        optpass.load(bad2)


def test_wrong_tensor_shape_is_a_clear_error(tiny_ckpt, tmp_path):
    bad = _copy(tiny_ckpt[1], tmp_path / "shape")
    tensors = load_file(str(bad / WEIGHTS_FILE))
    tensors["lm_head.scale"] = torch.ones(7)
    save_file(tensors, str(bad / WEIGHTS_FILE))
    _edit_state(bad, lambda s: s["weights"][WEIGHTS_FILE].update(sha256=_sha256(bad / WEIGHTS_FILE)))
    with pytest.raises(CheckpointError, match=r"tensor lm_head.scale has shape \(7,\), the model expects \(256,\)"):
        optpass.load(bad)


def test_unknown_pass_is_a_clear_error(tiny_ckpt, tmp_path):
    bad = _copy(tiny_ckpt[1], tmp_path / "unknown")
    _edit_state(bad, lambda s: s["passes"][0].update(name="warp_drive"))
    with pytest.raises(CheckpointError, match=r"optpass_state.json: unknown pass\(es\) \['warp_drive'\]; registered: .*quantize"):
        optpass.load(bad)


def test_pass_without_restore_is_refused_at_save(tiny_ckpt, tmp_path):
    from optpass.pass_base import Pass

    model, _ = tiny_ckpt
    step = model.optpass_plan.steps[0]
    original = step.pass_
    step.pass_ = type("NoRestore", (type(original),), {"restore": Pass.restore})(original.config)
    try:
        with pytest.raises(CheckpointError, match="pass 'quantize' changed the model but implements no restore"):
            optpass.save(model, tmp_path / "never")
    finally:
        step.pass_ = original
    assert not (tmp_path / "never").exists()


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="optpass_state.json: not found"):
        optpass.load(tmp_path)


@pytest.mark.slow
def test_smollm2_int4_int8_round_trip_greedy_tokens(smollm2, tmp_path):
    """int4 blocks + int8 head in one checkpoint: both schemes, one optimize() on SmolLM2."""
    from transformers import AutoTokenizer

    model, tokenizer = smollm2
    optimized = optpass.optimize(model, passes=[QuantizeConfig(weights="int4", lm_head="int8")])
    out = optpass.save(optimized, tmp_path / "smol", tokenizer=tokenizer)
    loaded = optpass.load(out)
    assert isinstance(loaded.model.layers[5].self_attn.q_proj, Int4Linear) and isinstance(loaded.lm_head, Int8Linear)
    tok = AutoTokenizer.from_pretrained(str(out))  # the directory stays usable by HF tools
    ids = tok("The quick brown fox jumps over the", return_tensors="pt").input_ids
    assert torch.equal(_greedy(loaded, ids, 16), _greedy(optimized, ids, 16))
