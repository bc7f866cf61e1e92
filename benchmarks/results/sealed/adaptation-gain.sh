#!/bin/bash
# The sealed test of the learned-adaptation-gain candidate (experiments/adaptation_gain.py): the
# committed tree exported with `git archive` to /tmp/sealed-gain/src, its best weights exported
# from the committed checkpoint; both horizons side by side, one torch thread each, nothing else
# running on the 2-core machine. Usage: adaptation-gain.sh [NAME] (default adaptation-gain): the
# outputs go to NAME-100/, NAME-1000/ and NAME-{100,1000}.log.
set -e
NAME=${1:-adaptation-gain}
COMMIT=$(git -C /work/main rev-parse HEAD)
rm -rf /tmp/sealed-gain && mkdir -p /tmp/sealed-gain/src
git -C /work/main archive "$COMMIT" | tar -x -C /tmp/sealed-gain/src
export LEARNED_OPT_SOURCE_COMMIT=$COMMIT
export PYTHONPATH=/tmp/sealed-gain/src
cd /tmp/sealed-gain/src
/work/main/.venv/bin/python -m learned_opt export experiments/checkpoints/adaptation-gain.pt \
  /tmp/sealed-gain/best.pt --which best
for T in 100 1000; do
  (
    echo "=== $T steps: $(date -u +%FT%TZ)"
    /work/main/.venv/bin/python benchmarks/sealed.py --weights /tmp/sealed-gain/best.pt \
      --steps $T --out /work/main/benchmarks/results/sealed/$NAME-$T
    echo "=== done $T: $(date -u +%FT%TZ)"
  ) > /work/main/benchmarks/results/sealed/$NAME-$T.log 2>&1 &
done
wait
