#!/bin/bash
set -e
export LEARNED_OPT_SOURCE_COMMIT=17110b4a096cbce95864793eb5fb7ce49e2b9aa4
export PYTHONPATH=/tmp/sealed/src
cd /tmp/sealed/src
for T in 100 1000; do
  echo "=== $T steps: $(date -u +%FT%TZ)"
  nice -n 5 /work/main/.venv/bin/python benchmarks/sealed.py --steps $T \
    --out /work/main/benchmarks/results/sealed/general-$T
  echo "=== done $T: $(date -u +%FT%TZ)"
done
