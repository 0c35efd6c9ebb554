"""compressed-tensors export (`optpass.save(..., format="compressed-tensors")`): the config and packed tensors
the package defines, the int4 re-encoding chosen against the quality budget, the record of what vLLM cannot
express, and stock transformers (a subprocess that never imports optpass) computing optpass's logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import optpass
from optpass.errors import CheckpointError, ExportError
from optpass.passes.quantize import QuantizeConfig
from tests.export_helpers import dequantized, quantize_as, sharp_tiny_llama

pytest.importorskip("compressed_tensors")

# loads each directory with stock transformers and writes its logits on the given ids; fails if optpass was imported
LOAD_WITH_TRANSFORMERS = """
import sys, torch
from transformers import AutoModelForCausalLM
ids = torch.load(sys.argv[1])
out = {}
for path in sys.argv[3:]:
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        out[path] = model.eval()(input_ids=ids).logits
assert "optpass" not in sys.modules
torch.save(out, sys.argv[2])
"""


@pytest.fixture(scope="module")
def optimized():
    return optpass.optimize(sharp_tiny_llama(), passes=[QuantizeConfig(weights="int4", lm_head="int8", fast_decode=False)],
                            quality_budget="kl:1")


def _transformers_logits(tmp_path, ids: torch.Tensor, *dirs) -> dict:
    torch.save(ids, tmp_path / "ids.pt")
    run = subprocess.run([sys.executable, "-c", LOAD_WITH_TRANSFORMERS, str(tmp_path / "ids.pt"),
                          str(tmp_path / "logits.pt"), *map(str, dirs)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(tmp_path / "logits.pt")


def test_w4a16_config_and_packed_tensors(optimized, tmp_path):
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    out = optpass.save(optimized, tmp_path / "ct", format="compressed-tensors", int4="w4a16")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == []
    groups = {g["weights"]["num_bits"]: g for g in qc["config_groups"].values()}
    assert {"strategy": "group", "group_size": 32, "symmetric": False, "type": "int"}.items() <= groups[4]["weights"].items()
    assert {"strategy": "channel", "symmetric": True}.items() <= groups[8]["weights"].items()
    assert groups[8]["targets"] == ["re:^lm_head$"]
    assert r"re:^model\.layers\.\d+\.mlp\.down_proj$" in groups[4]["targets"] and len(groups[4]["targets"]) == 7
    config = QuantizationConfig.model_validate(qc)  # the package reads its own config back
    tensors = load_file(str(out / "model.safetensors"))
    down = "model.layers.1.mlp.down_proj"
    assert tensors[f"{down}.weight_packed"].dtype == torch.int32 and tensors[f"{down}.weight_packed"].shape == (64, 16)
    assert tensors[f"{down}.weight_zero_point"].shape == (8, 4)  # packed along N, as vLLM reads it
    assert tensors[f"{down}.weight_scale"].shape == (64, 4) and f"{down}.qweight" not in tensors
    scheme = next(g for g in config.config_groups.values() if g.weights.num_bits == 4)
    local = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(down + ".")}
    served = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    module = optimized.model.layers[1].mlp.down_proj
    step = module.scale.repeat_interleave(32, dim=1)
    assert bool(((served - dequantized(module)).abs() <= 0.5 * step + 1e-6).all())  # integer zero: <= half a step
    assert not torch.equal(served, dequantized(module))
    state = json.loads((out / "optpass_state.json").read_text())
    assert state["format"] == "optpass-export" and state["export"]["int4"] == {"chosen": "w4a16", "how": "requested"}
    assert [p["name"] for p in state["passes"]] == ["quantize"] and len(state["export"]["vllm_schemes"]) == 2
    assert 0.3 < state["export"]["weight_error"]["max_in_steps"] <= 0.5
    with pytest.raises(CheckpointError, match="an export for compressed-tensors .* not an optpass checkpoint"):
        optpass.load(out)


def test_auto_keeps_w4a16_within_budget_and_falls_back_to_w8a16_over_it(optimized, tmp_path):
    out = optpass.save(optimized, tmp_path / "auto", format="compressed-tensors")
    record = json.loads((out / "optpass_state.json").read_text())["export"]["int4"]
    assert record["chosen"] == "w4a16" and record["candidates"]["w4a16"]["violations"] == []
    budget = optimized.optpass_report.budget
    optimized.optpass_report.budget = {"max_kl": 1e-12}
    try:
        with pytest.warns(UserWarning, match="even w8a16 is over the quality budget"):  # 1e-12: nothing fits
            out = optpass.save(optimized, tmp_path / "strict", format="compressed-tensors")
    finally:
        optimized.optpass_report.budget = budget
    record = json.loads((out / "optpass_state.json").read_text())["export"]["int4"]
    assert record["chosen"] == "w8a16" and record["candidates"]["w4a16"]["violations"][0].startswith("KL")
    assert record["candidates"]["w8a16"]["metrics"]["kl"] < record["candidates"]["w4a16"]["metrics"]["kl"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    schemes = {(g["weights"]["num_bits"], g["weights"]["strategy"]) for g in qc["config_groups"].values()}
    assert schemes == {(8, "group"), (8, "channel")}  # the re-encoded blocks and the int8 head


def test_stock_transformers_loads_the_exports_without_optpass(optimized, tmp_path):
    """W8A16 int4 re-encoding, exact int8 layers, a float head in `ignore`, removed blocks renumbered, int4 with
    float zero points: each loads in transformers (no missing / unexpected keys) and computes the logits of its
    fp32 twin in optpass (for "float-zero": optpass's own int4 weights, unchanged)."""
    from optpass.export.candidates import float_twin
    from optpass.export.ct_layers import engine_layer
    from optpass.passes.layer_skip import RemovedBlock

    int8 = quantize_as(sharp_tiny_llama(), {"proj": ("int8", 0), "mlp.down_proj": ("int8", 32)})
    skipped = quantize_as(sharp_tiny_llama(), {"proj": ("int4", 32)})
    skipped.model.layers[0] = RemovedBlock(0)
    dirs = {"w8a16": optpass.save(optimized, tmp_path / "w8", format="compressed-tensors", int4="w8a16"),
            "int8": optpass.save(int8, tmp_path / "i8", format="compressed-tensors"),
            "skip": optpass.save(skipped, tmp_path / "skip", format="compressed-tensors", int4="w8a16"),
            "float-zero": optpass.save(optimized, tmp_path / "fz", format="compressed-tensors", int4="float-zero")}
    assert json.loads((dirs["int8"] / "config.json").read_text())["quantization_config"]["ignore"] == ["lm_head"]
    assert json.loads((dirs["skip"] / "config.json").read_text())["num_hidden_layers"] == 1
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    got = _transformers_logits(tmp_path, ids, *dirs.values())
    fz_state = json.loads((dirs["float-zero"] / "optpass_state.json").read_text())["export"]
    assert fz_state["int4"] == {"chosen": "float-zero", "how": "requested"}
    assert any(s.startswith("none: vLLM") for s in fz_state["vllm_schemes"])  # said plainly: vLLM won't serve it
    for key, model in (("w8a16", optimized), ("int8", int8), ("skip", skipped), ("float-zero", optimized)):
        encoding = "float-zero" if key == "float-zero" else "w8a16"
        with torch.no_grad():
            want = float_twin(model, lambda lw: engine_layer(lw, encoding).dequantized())(input_ids=ids).logits
            ours = model(input_ids=ids).logits
        torch.testing.assert_close(got[str(dirs[key])], want, rtol=0, atol=1e-4)
        assert float((got[str(dirs[key])].argmax(-1) == ours.argmax(-1)).float().mean()) >= 0.95


def test_unexported_decisions_are_recorded_with_their_effect():
    from optpass.export.common import decisions_not_exported

    state = {"passes": [{"name": "quantize", "config": {}, "state": {"modules": {"lm_head": {"w8a8_min_rows": 64}}}},
                        {"name": "kv_cache", "config": {"policy": "snapkv"}},
                        {"name": "linear_attention", "config": {"share": 0.5}}],
             "runtime": {"compiled_step": True}}
    with pytest.warns(UserWarning, match="linear_attention change what optpass's model computes"):
        out = {d["pass"]: d["effect"] for d in decisions_not_exported(state, "vLLM")}
    assert set(out) == {"kv_cache", "linear_attention", "quantize", "runtime"}
    assert out["kv_cache"].startswith("serving policy") and out["linear_attention"].startswith("changes outputs")
    assert "W8A8" in out["quantize"] and "compiled step" in out["runtime"]


def test_refusals(tmp_path, tiny_dit):
    with pytest.raises(ExportError, match="no quantized linear layers"):
        optpass.save(sharp_tiny_llama(), tmp_path / "plain", format="compressed-tensors")
    with pytest.raises(ExportError, match="is not a transformers model"):
        optpass.save(tiny_dit, tmp_path / "dit", format="compressed-tensors")
    model = quantize_as(sharp_tiny_llama(), {"proj": ("int4", 32)})
    with pytest.raises(ExportError, match="int4='w2a16'; choose auto, w4a16, w8a16, float-zero"):
        optpass.save(model, tmp_path / "bad", format="compressed-tensors", int4="w2a16")
    with pytest.raises(ExportError, match="writes a directory"):
        optpass.save(model, tmp_path / "x.gguf", format="compressed-tensors")
