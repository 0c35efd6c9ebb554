"""`optpass optimize ... --format {optpass,gguf,compressed-tensors} -o OUT`: the format and its output path are
checked before any model loads, the architecture before any optimization, and each format is written."""

from __future__ import annotations

import json

import pytest

import optpass
from optpass.cli import main


@pytest.fixture
def hf_dir(tmp_path, tiny_llama):
    path = tmp_path / "hf"
    tiny_llama.save_pretrained(path)
    return path


@pytest.mark.parametrize("argv, named", [
    (["--format", "ggml", "-o", "out"], "unknown export format 'ggml'"),
    (["--format", "gguf"], "--format gguf: give the output path with -o"),
    (["--format", "gguf", "-o", "out_dir"], "must be a file name ending in .gguf"),
    (["--format", "compressed-tensors", "-o", "model.gguf"], "writes a directory"),
])
def test_format_is_checked_before_any_model_loads(argv, named, capsys, monkeypatch):
    import optpass.models
    import optpass.sources

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before --format was checked")

    monkeypatch.setattr(optpass.sources, "load_model_source", no_loading)
    monkeypatch.setattr(optpass.models, "load_builtin", no_loading)
    assert main(["optimize", "smollm2", *argv]) == 2
    assert named in capsys.readouterr().err


def test_architecture_is_checked_before_optimizing(tmp_path, capsys, monkeypatch):
    from tests.model_zoo import qwen2

    qwen2().save_pretrained(tmp_path / "qwen2")
    monkeypatch.setattr(optpass, "optimize", lambda *a, **k: pytest.fail("optimized a model GGUF cannot express"))
    assert main(["optimize", str(tmp_path / "qwen2"), "--format", "gguf", "-o", str(tmp_path / "q.gguf")]) == 2
    assert "Qwen2ForCausalLM (qwen2) is not supported" in capsys.readouterr().err


@pytest.mark.parametrize("fmt, name", [("gguf", "tiny.gguf"), ("compressed-tensors", "tiny-ct")])
def test_optimize_writes_the_format(fmt, name, hf_dir, tmp_path, capsys):
    out = tmp_path / name
    assert main(["optimize", str(hf_dir), "--passes", "quantize", "--format", fmt, "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    if fmt == "gguf":
        import gguf

        types = {t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
        assert types & {"Q4_1", "Q8_0"}
    else:
        config = json.loads((out / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "compressed-tensors"
        assert json.loads((out / "optpass_state.json").read_text())["export"]["format"] == fmt
