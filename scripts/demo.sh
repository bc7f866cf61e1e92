#!/usr/bin/env bash
# Set up (if needed), then the main job: each shipped LSTMOptimizer against Adam with a tuned
# learning rate on the paper's MNIST task (784-20-10 sigmoid MLP, batch 128, 100 steps), 20 seeds:
# the default weights (`general-v4`, meta-trained on a diverse task distribution) and the paper's
# (`paper-mnist`, meta-trained on this task). Prints the tables; writes
# results/demo/<weights>/records.jsonl and results/demo/<weights>/curves.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for weights in general-v4 paper-mnist; do
  echo "== LSTMOptimizer(weights=\"$weights\") vs tuned Adam =="
  .venv/bin/learned-opt eval --weights "$weights" --family mnist --steps 100 --seeds 20 \
    --tune-seeds 5 --baselines adam --records "results/demo/$weights/records.jsonl" \
    --plot "results/demo/$weights/curves.png" "$@"
done
