#!/usr/bin/env bash
# Runs the whole test suite: lint, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
