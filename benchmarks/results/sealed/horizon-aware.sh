#!/bin/bash
set -e
export LEARNED_OPT_SOURCE_COMMIT=c9e81595b79e00eb0f00ec52f052edcae65750ed
export PYTHONPATH=/tmp/sealed/src
cd /tmp/sealed/src
for T in 100 1000; do
  echo "=== $T steps: $(date -u +%FT%TZ)"
  /work/main/.venv/bin/python benchmarks/sealed.py --weights /tmp/sealed/best-50.pt --total-steps --steps $T \
    --out /work/main/benchmarks/results/sealed/horizon-aware-$T
  echo "=== done $T: $(date -u +%FT%TZ)"
done
