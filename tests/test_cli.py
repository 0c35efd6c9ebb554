"""The `optpass` command line: optimize -> checkpoint -> run, bench, and one-line errors with exit codes."""

from __future__ import annotations

import argparse

import subprocess
from pathlib import Path
import sys

import pytest
import torch

import optpass
from optpass.backends.cpu.quant_linear import QuantizedLinear
from optpass.cli import main


@pytest.fixture
def hf_dir(tmp_path, tiny_llama):
    path = tmp_path / "hf"
    tiny_llama.save_pretrained(path)
    return path


def _optpass() -> list[str]:
    """The console script installed beside this interpreter (pip install -e; not another environment's on PATH),
    else the same entry function through the interpreter."""
    script = Path(sys.executable).parent / "optpass"
    return [str(script)] if script.exists() else [sys.executable, "-c", "import sys; from optpass.cli import main; sys.exit(main())"]


def test_help_lists_commands_in_a_subprocess():
    out = subprocess.run([*_optpass(), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for name in ("optimize", "run", "bench"):
        assert name in out.stdout
    sub = subprocess.run([*_optpass(), "run", "--help"], capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0 and "--max-new-tokens" in sub.stdout


def test_optimize_help_names_every_built_in_model():
    from optpass.cli import build_parser
    from optpass.models import BUILTIN_MODELS

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["optimize"]
    model_help = next(a.help for a in sub._actions if a.dest == "model")
    assert all(name in model_help for name in BUILTIN_MODELS), model_help


def test_unknown_model_name_is_a_usage_error(capsys):
    assert main(["optimize", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("optpass optimize: error: unknown model 'no-such-model'") and "smollm2" in err
    assert "Traceback" not in err


def test_verbose_prints_the_traceback(capsys):
    assert main(["--verbose", "optimize", "no-such-model"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_optimize_hf_directory_writes_a_loadable_checkpoint(hf_dir, tmp_path, tiny_llama, capsys):
    out = tmp_path / "out"
    assert main(["optimize", str(hf_dir), "--passes", "quantize", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "optpass report" in printed and f"wrote {out}" in printed
    loaded = optpass.load(out)
    assert isinstance(loaded.model.layers[1].mlp.up_proj, QuantizedLinear)
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert optpass.quality.top1_agreement(tiny_llama(input_ids=ids).logits, loaded(input_ids=ids).logits) > 0.8
    # no tokenizer was saved for the tiny model: `run` says so in one line
    assert main(["run", str(out), "--prompt", "hi"]) == 2
    assert "no tokenizer saved alongside the checkpoint" in capsys.readouterr().err


def test_input_file_errors(hf_dir, tmp_path, capsys):
    assert main(["optimize", str(hf_dir), "--calibration", str(tmp_path / "missing.txt")]) == 2
    assert "--calibration" in capsys.readouterr().err
    text = tmp_path / "calib.txt"
    text.write_text("some calibration text " * 50)
    assert main(["optimize", str(hf_dir), "--calibration", str(text)]) == 2
    assert "no local tokenizer" in capsys.readouterr().err
    assert main(["optimize", str(tmp_path / "model.onnx")]) == 2
    assert "model.onnx" in capsys.readouterr().err
    assert main(["run", str(tmp_path), "--prompt", "x"]) == 2
    assert "optpass_state.json: not found" in capsys.readouterr().err


def test_run_samples_a_png_from_a_dit_checkpoint(tmp_path, tiny_dit, capsys):
    optpass.save(tiny_dit, tmp_path / "dit")
    png = tmp_path / "grid.png"
    assert main(["run", str(tmp_path / "dit"), "--image", str(png), "--steps", "2"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}: 10 samples, 2 DDIM steps" in capsys.readouterr().out  # one per class label


def test_bench_prints_the_side_by_side_table(hf_dir, capsys):
    # dead_code finds nothing in Llama: both arms are the same model, so quality must match exactly
    assert main(["bench", str(hf_dir), "--passes", "dead_code", "--rounds", "1", "--new-tokens", "4",
                 "--prompt-tokens", "16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("arm"))
    assert "decode tok/s" in lines[header] and "perplexity" in lines[header]
    base, opt = (lines[header + 1].split(), lines[header + 2].split())
    assert base[0] == "baseline" and opt[0] == "optimized"
    assert base[-1] == opt[-1] and float(base[2]) > 0  # same perplexity, positive tok/s


@pytest.mark.slow
def test_smollm2_optimize_then_run(tmp_path, capsys, smollm2):
    from optpass.checkpoint import load

    out = tmp_path / "smol"
    assert main(["optimize", "smollm2", "--target", "cpu", "--passes", "quantize", "-o", str(out)]) == 0
    capsys.readouterr()
    prompt = "The capital of France is"
    assert main(["run", str(out), "--prompt", prompt, "--max-new-tokens", "8", "--no-compile"]) == 0
    text = capsys.readouterr().out.strip()
    assert text.startswith(prompt) and len(text) > len(prompt)
    model, tokenizer = smollm2
    loaded = load(out)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        new = type(loaded).generate(loaded, input_ids=ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    assert text == prompt + tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("argv, named", [
    (["optimize", "smollm2", "--target", "h900"], "h900"),
    (["optimize", "smollm2", "--passes", "quantize,warp_drive"], "warp_drive"),
    (["optimize", "smollm2", "--quality-budget", "ppl=lots"], "ppl=lots"),
    (["optimize", "gpt-17"], "gpt-17"),
    (["bench", "smollm2", "--target", "h900"], "h900"),
    (["explain", "smollm2", "--passes", "warp_drive"], "warp_drive"),
])
def test_bad_names_are_refused_before_any_model_loads(argv, named, capsys, monkeypatch):
    """Exit code 2 and the name in the message, without loading the model (loading would fail the test)."""
    import optpass.models
    import optpass.sources

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the names were checked")

    monkeypatch.setattr(optpass.sources, "load_model_source", no_loading)
    monkeypatch.setattr(optpass.models, "load_builtin", no_loading)
    assert main(argv) == 2
    assert named in capsys.readouterr().err


def test_run_refuses_options_that_do_not_apply_to_the_checkpoint(tmp_path, tiny_dit, tiny_llama, capsys):
    optpass.save(tiny_dit, tmp_path / "dit")
    assert main(["run", str(tmp_path / "dit"), "--prompt", "a cat"]) == 2
    err = capsys.readouterr().err
    assert "--prompt" in err and "diffusion transformer" in err
    optpass.save(tiny_llama, tmp_path / "llm")
    assert main(["run", str(tmp_path / "llm"), "--prompt", "hi", "--steps", "3"]) == 2
    assert "--steps" in capsys.readouterr().err
