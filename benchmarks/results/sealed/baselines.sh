#!/bin/bash
# Baselines added to the sealed benchmark after the runs of the register, run beside the shipped
# default weights told the horizon (`--total-steps`): the committed tree exported with
# `git archive` to /tmp/sealed-NAME/src; one torch thread; a baseline is no candidate (nothing
# is chosen on it), and the learned rows let its ratios be read against the default's in one run.
# Usage: baselines.sh NAME OPTIMIZERS [HORIZON]
#   NAME: the runs' name (NAME-{100,1000}/ here); OPTIMIZERS: comma list of sealed.py's;
#   HORIZON: one horizon alone (default: both, side by side).
# Commit: $COMMIT (default HEAD).
set -e
NAME=$1 OPTS=$2
COMMIT=$(git -C /work/main rev-parse "${COMMIT:-HEAD}")
mkdir -p /tmp/sealed-"$NAME"/src
git -C /work/main archive "$COMMIT" | tar -x -C /tmp/sealed-"$NAME"/src
export LEARNED_OPT_SOURCE_COMMIT=$COMMIT
export PYTHONPATH=/tmp/sealed-$NAME/src
cd /tmp/sealed-"$NAME"/src
PY=/work/main/.venv/bin/python
OUT=/work/main/benchmarks/results/sealed
sealed() {
  echo "=== $1 steps: $(date -u +%FT%TZ) commit $COMMIT"
  $PY benchmarks/sealed.py --total-steps --optimizers "learned,$OPTS" --steps "$1" \
    --out $OUT/"$NAME"-"$1"
  echo "=== done $1: $(date -u +%FT%TZ)"
}
if [ -n "$3" ]; then
  sealed "$3" > $OUT/"$NAME"-"$3".log 2>&1
  exit
fi
sealed 1000 > $OUT/"$NAME"-1000.log 2>&1 &
sealed 100 > $OUT/"$NAME"-100.log 2>&1
wait
