#!/bin/bash
# The sealed test of the retuned-shrinking candidate (experiments/adaptation_shrink.py): the
# committed tree exported with `git archive` to /tmp/sealed-shrink/src, the candidate's weights
# written by the recipe from it; both horizons side by side, one torch thread each, on the 2-core
# machine.
# Outputs: adaptation-shrink-{100,1000}/ and adaptation-shrink-{100,1000}.log here.
# Usage: adaptation-shrink.sh [HORIZON]: one horizon alone (a run to repeat after an interruption),
# of the commit in $COMMIT (default HEAD).
set -e
COMMIT=$(git -C /work/main rev-parse "${COMMIT:-HEAD}")
rm -rf /tmp/sealed-shrink && mkdir -p /tmp/sealed-shrink/src
git -C /work/main archive "$COMMIT" | tar -x -C /tmp/sealed-shrink/src
export LEARNED_OPT_SOURCE_COMMIT=$COMMIT
export PYTHONPATH=/tmp/sealed-shrink/src
cd /tmp/sealed-shrink/src
PY=/work/main/.venv/bin/python
OUT=/work/main/benchmarks/results
$PY experiments/adaptation_shrink.py --steps weights
sealed() {
  echo "=== $1 steps: $(date -u +%FT%TZ)"
  $PY benchmarks/sealed.py --weights runs/adaptation-shrink/weights.pt --steps "$1" \
    --out $OUT/sealed/adaptation-shrink-"$1"
  echo "=== done $1: $(date -u +%FT%TZ)"
}
if [ -n "$1" ]; then
  sealed "$1" > $OUT/sealed/adaptation-shrink-"$1".log 2>&1
  exit
fi
sealed 1000 > $OUT/sealed/adaptation-shrink-1000.log 2>&1 &
sealed 100 > $OUT/sealed/adaptation-shrink-100.log 2>&1
wait
