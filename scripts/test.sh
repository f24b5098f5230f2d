#!/usr/bin/env bash
# Runs the whole test suite: services (PostgreSQL, Redis), the browser for tests/ui, vLLM for
# tests/vllm, lint, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
scripts/browser.sh  # headless Chromium for the web playground's tests (tests/ui)
scripts/setup_vllm.sh  # vLLM in .venv-vllm, for the vLLM engine's tests (tests/vllm)
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
