#!/usr/bin/env bash
# Runs the whole test suite: services (PostgreSQL, Redis), the browser for tests/ui, lint, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
scripts/browser.sh  # headless Chromium for the web playground's tests (tests/ui)
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
