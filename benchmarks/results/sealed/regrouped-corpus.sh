#!/bin/bash
# The sealed test of the shipped `general-v2` (the default) and `general-wide` after the corpus's
# topics that share text were grouped into one part each (learned_opt/corpus.py): the three
# language-model tasks read new text, the other five are as before. The committed tree exported
# with `git archive` to /tmp/sealed-regrouped/src; four runs, two at a time, one torch thread
# each, on the 2-core machine, nothing else running. Outputs: {general-v2,general-wide}-regrouped-
# {100,1000}/ and their .log files here.
set -e
COMMIT=$(git -C /work/main rev-parse HEAD)
rm -rf /tmp/sealed-regrouped && mkdir -p /tmp/sealed-regrouped/src
git -C /work/main archive "$COMMIT" | tar -x -C /tmp/sealed-regrouped/src
export LEARNED_OPT_SOURCE_COMMIT=$COMMIT
export PYTHONPATH=/tmp/sealed-regrouped/src
export OMP_NUM_THREADS=1
cd /tmp/sealed-regrouped/src
PY=/work/main/.venv/bin/python
OUT=/work/main/benchmarks/results/sealed
sealed() {
  echo "=== $1 $2 steps: $(date -u +%FT%TZ)"
  $PY benchmarks/sealed.py --weights "$1" --steps "$2" --out $OUT/"$1"-regrouped-"$2"
  echo "=== done $1 $2: $(date -u +%FT%TZ)"
}
(sealed general-v2 1000 > $OUT/general-v2-regrouped-1000.log 2>&1
 sealed general-wide 100 > $OUT/general-wide-regrouped-100.log 2>&1) &
sealed general-v2 100 > $OUT/general-v2-regrouped-100.log 2>&1
sealed general-wide 1000 > $OUT/general-wide-regrouped-1000.log 2>&1
wait
