#!/usr/bin/env bash
# Set up (if needed) and run the default test suite (slow tests excluded: add `-m slow` for them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
