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
