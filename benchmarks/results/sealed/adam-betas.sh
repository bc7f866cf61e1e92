#!/bin/bash
# The sealed test of the retuned-momenta candidate (experiments/adam_betas.py): the
# committed tree exported with `git archive` to /tmp/sealed-betas/src, the candidate's weights
# written by the recipe from it; both horizons side by side, one torch thread each, on the 2-core
# machine.
# Outputs: adam-betas-{100,1000}/ and adam-betas-{100,1000}.log here.
set -e
COMMIT=$(git -C /work/main rev-parse HEAD)
rm -rf /tmp/sealed-betas && mkdir -p /tmp/sealed-betas/src
git -C /work/main archive "$COMMIT" | tar -x -C /tmp/sealed-betas/src
export LEARNED_OPT_SOURCE_COMMIT=$COMMIT
export PYTHONPATH=/tmp/sealed-betas/src
cd /tmp/sealed-betas/src
PY=/work/main/.venv/bin/python
OUT=/work/main/benchmarks/results
$PY experiments/adam_betas.py --steps weights
sealed() {
  echo "=== $1 steps: $(date -u +%FT%TZ)"
  $PY benchmarks/sealed.py --weights runs/adam-betas/weights.pt --steps "$1" \
    --out $OUT/sealed/adam-betas-"$1"
  echo "=== done $1: $(date -u +%FT%TZ)"
}
sealed 1000 > $OUT/sealed/adam-betas-1000.log 2>&1 &
sealed 100 > $OUT/sealed/adam-betas-100.log 2>&1
wait
