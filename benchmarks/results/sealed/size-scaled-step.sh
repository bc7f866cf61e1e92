#!/bin/bash
# The sealed test of the size-scaled-step candidate (experiments/size_scaled_step.py): the
# committed tree exported with `git archive` to /tmp/sealed-size/src, the candidate's weights
# written by the recipe from it; both horizons side by side, one torch thread each, on the 2-core
# machine (the time-to-target benchmark of the same weights beside them for most of the
# 1,000-step run). Outputs: size-scaled-step-{100,1000}/ and size-scaled-step-{100,1000}.log here.
set -e
COMMIT=$(git -C /work/main rev-parse HEAD)
rm -rf /tmp/sealed-size && mkdir -p /tmp/sealed-size/src
git -C /work/main archive "$COMMIT" | tar -x -C /tmp/sealed-size/src
export LEARNED_OPT_SOURCE_COMMIT=$COMMIT
export PYTHONPATH=/tmp/sealed-size/src
cd /tmp/sealed-size/src
PY=/work/main/.venv/bin/python
OUT=/work/main/benchmarks/results
$PY experiments/size_scaled_step.py --steps weights
sealed() {
  echo "=== $1 steps: $(date -u +%FT%TZ)"
  $PY benchmarks/sealed.py --weights runs/size-scaled-step/weights.pt --steps "$1" \
    --out $OUT/sealed/size-scaled-step-"$1"
  echo "=== done $1: $(date -u +%FT%TZ)"
}
sealed 1000 > $OUT/sealed/size-scaled-step-1000.log 2>&1 &
sealed 100 > $OUT/sealed/size-scaled-step-100.log 2>&1
wait
