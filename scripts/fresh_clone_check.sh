#!/usr/bin/env bash
# A new user's machine, approximated: a fresh clone of this repository, a stock PATH (no pyenv shims, so no
# `python`, only the system `python3`), empty optpass / Inductor / torch-extension / Triton caches, then the
# README's two commands verbatim. Prints each command's exit code and time.
#     bash scripts/fresh_clone_check.sh [/tmp/fresh]
set -u
REPO="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-/tmp/fresh}"
CACHES="$DEST-caches"
rm -rf "$DEST" "$CACHES" && mkdir -p "$CACHES"/{optpass,inductor,ext,triton}
git clone -q "$REPO" "$DEST" && cd "$DEST" || exit 1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
unset PYENV_VERSION PYENV_ROOT VIRTUAL_ENV
export OPTPASS_CACHE="$CACHES/optpass" TORCHINDUCTOR_CACHE_DIR="$CACHES/inductor" \
       TORCH_EXTENSIONS_DIR="$CACHES/ext" TRITON_CACHE_DIR="$CACHES/triton"
echo "python: $(command -v python || echo none)  python3: $(command -v python3) ($(python3 --version))"
git log --oneline | head -1
t0=$(date +%s)
bash scripts/setup.sh && .venv/bin/optpass optimize smollm2 --target cpu
echo "main job: exit $? in $(( $(date +%s) - t0 )) s"
t1=$(date +%s)
bash scripts/setup.sh && .venv/bin/python -m pytest -q -p no:cacheprovider
echo "tests: exit $? in $(( $(date +%s) - t1 )) s"
