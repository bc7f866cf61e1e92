#!/bin/bash
# The sealed test of the retuned-adaptation candidate (experiments/adaptation_rate.py): the
# committed tree exported with `git archive` to /tmp/sealed-rate/src, the candidate's weights
# written by the recipe from it; 1,000 steps in the background and 100 steps after the recipe's
# validation step, one torch thread each, on the 2-core machine. Outputs: adaptation-rate-{100,1000}/
# and adaptation-rate-{100,1000}.log here, the validation table in
# benchmarks/results/validation/adaptation-rate/.
set -e
COMMIT=$(git -C /work/main rev-parse HEAD)
rm -rf /tmp/sealed-rate && mkdir -p /tmp/sealed-rate/src
git -C /work/main archive "$COMMIT" | tar -x -C /tmp/sealed-rate/src
export LEARNED_OPT_SOURCE_COMMIT=$COMMIT
export PYTHONPATH=/tmp/sealed-rate/src
cd /tmp/sealed-rate/src
PY=/work/main/.venv/bin/python
OUT=/work/main/benchmarks/results
$PY experiments/adaptation_rate.py --steps weights
sealed() {
  echo "=== $1 steps: $(date -u +%FT%TZ)"
  $PY benchmarks/sealed.py --weights runs/adaptation-rate/weights.pt --steps "$1" \
    --out $OUT/sealed/adaptation-rate-"$1"
  echo "=== done $1: $(date -u +%FT%TZ)"
}
sealed 1000 > $OUT/sealed/adaptation-rate-1000.log 2>&1 &
$PY experiments/adaptation_rate.py --steps validate > $OUT/validation/adaptation-rate.log 2>&1
mkdir -p $OUT/validation/adaptation-rate
cp -r benchmarks/results/validation/adaptation-rate/. $OUT/validation/adaptation-rate/
sealed 100 > $OUT/sealed/adaptation-rate-100.log 2>&1
wait
