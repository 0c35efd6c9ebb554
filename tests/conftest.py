"""Shared fixtures: tiny random models for fast tests, SmolLM2 (real weights) loaded once per session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OPTPASS_PROGRESS", "0")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _no_machine_calibration(tmp_path_factory, monkeypatch):
    """Tests plan against the uncalibrated CPU spec unless they calibrate themselves: a calibration this machine
    cached (`optpass calibrate`, or a benchmark run) changes which candidates rank first."""
    monkeypatch.setenv("OPTPASS_CALIBRATION_DIR", str(tmp_path_factory.mktemp("calibration")))


@pytest.fixture(scope="session")
def smollm2():
    from optpass.models import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def smollm2_graph(smollm2):
    from optpass.capture import capture

    return capture(smollm2[0])


@pytest.fixture
def tiny_llama():
    from optpass.models import tiny_llama

    return tiny_llama()


@pytest.fixture
def tiny_dit():
    from optpass.models import tiny_dit

    return tiny_dit()


@pytest.fixture(params=["bf16 kernel", "flex"])
def cpu_lowering(request, monkeypatch):
    """Both CPU lowerings of block-sparse / prefill attention: optpass's bf16 kernel (AVX-512 BF16 CPUs; skipped
    elsewhere) and FlexAttention (what other CPUs run). Yields the tolerance against an fp32 reference."""
    from optpass.backends.cpu import prefill_attention

    if request.param == "flex":
        monkeypatch.setattr(prefill_attention, "applies", lambda *args, **kwargs: False)
        return {"atol": 1e-5, "rtol": 1e-5}
    if not prefill_attention.available():
        pytest.skip("optpass::prefill_attention needs a CPU with AVX-512 BF16 and a C++ compiler")
    # q, k, v and the softmax weights rounded to bf16, fp32 sums (bf16 SDPA's numerics)
    return {"atol": 2e-2, "rtol": 2e-2}
