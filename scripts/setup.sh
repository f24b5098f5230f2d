#!/usr/bin/env bash
# Installs the project into .venv/ (idempotent: a second run only checks and returns).
# torch goes in first and pinned: `torch==2.13.0` is the CPU build on this machine kind's disk,
# whereas an unpinned torch would pull a multi-GB CUDA build. Set TORCH_SPEC (and TORCH_INDEX_URL)
# to choose another build on GPU hosts.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
fi

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    # TORCH_INDEX_URL picks a wheel index, e.g. https://download.pytorch.org/whl/cu128 on GPU hosts.
    .venv/bin/python -m pip install --quiet "$TORCH_SPEC" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi

# Reinstall the project only when its dependency list changed since the last install.
stamp=.venv/.detox-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    touch "$stamp"
fi
