#!/usr/bin/env bash
# Set up (if needed), lint (ruff, pinned in the dev extras), and run the default test suite (slow
# tests excluded: add `-m slow` for them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest "$@"
