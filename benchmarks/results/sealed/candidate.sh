#!/bin/bash
# The sealed test of a settings recipe's candidate: the committed tree exported with
# `git archive` to /tmp/sealed-NAME/src, the candidate's weights written by the recipe from it;
# both horizons side by side, one torch thread each, on the 2-core machine.
# Usage: candidate.sh RECIPE NAME [HORIZON]
#   RECIPE: experiments/<recipe>.py; NAME: its sealed runs' name (runs/NAME/weights.pt);
#   HORIZON: one horizon alone (a run to repeat after an interruption).
# Commit: $COMMIT (default HEAD). SEALED_ARGS: more options of sealed.py (e.g. --total-steps).
# Outputs: NAME-{100,1000}/ and NAME-{100,1000}.log here.
set -e
RECIPE=$1 NAME=$2
COMMIT=$(git -C /work/main rev-parse "${COMMIT:-HEAD}")
rm -rf /tmp/sealed-"$NAME" && mkdir -p /tmp/sealed-"$NAME"/src
git -C /work/main archive "$COMMIT" | tar -x -C /tmp/sealed-"$NAME"/src
export LEARNED_OPT_SOURCE_COMMIT=$COMMIT
export PYTHONPATH=/tmp/sealed-$NAME/src
cd /tmp/sealed-"$NAME"/src
PY=/work/main/.venv/bin/python
OUT=/work/main/benchmarks/results/sealed
$PY "$RECIPE" --steps weights
sealed() {
  echo "=== $1 steps: $(date -u +%FT%TZ) commit $COMMIT"
  # shellcheck disable=SC2086  # SEALED_ARGS: several options
  $PY benchmarks/sealed.py --weights runs/"$NAME"/weights.pt --steps "$1" --out $OUT/"$NAME"-"$1" \
    ${SEALED_ARGS:-}
  echo "=== done $1: $(date -u +%FT%TZ)"
}
if [ -n "$3" ]; then
  sealed "$3" > $OUT/"$NAME"-"$3".log 2>&1
  exit
fi
sealed 1000 > $OUT/"$NAME"-1000.log 2>&1 &
sealed 100 > $OUT/"$NAME"-100.log 2>&1
wait
