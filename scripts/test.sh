#!/usr/bin/env bash
# Runs the whole test suite: services (PostgreSQL, Redis), lint, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
