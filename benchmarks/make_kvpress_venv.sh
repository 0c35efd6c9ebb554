#!/usr/bin/env bash
# The peer virtualenv for benchmarks/kv_quality.py --peer-python: NVIDIA kvpress 0.5.5 pins transformers < 5.3,
# which cannot share optpass's .venv (newest transformers). torch==2.13.0 first: the CPU build.
#     bash benchmarks/make_kvpress_venv.sh [/path/to/venv]    (default: .venv-kvpress)
set -euo pipefail
VENV="${1:-.venv-kvpress}"
"${OPTPASS_PYTHON:-python3}" -m venv "$VENV"
PIP="$VENV/bin/python -m pip install --disable-pip-version-check -q"
$PIP "torch==2.13.0"
$PIP "kvpress==0.5.5" "transformers<5.3" accelerate
"$VENV/bin/python" -c "import kvpress, transformers; print('kvpress venv ready: transformers', transformers.__version__)"
