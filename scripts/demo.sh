#!/usr/bin/env bash
# Set up (if needed), then the main job: the shipped LSTMOptimizer against Adam with a tuned
# learning rate on the paper's MNIST task (784-20-10 sigmoid MLP, batch 128, 100 steps), 20 seeds.
# Prints the table; writes results/demo/records.jsonl and results/demo/curves.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/learned-opt eval --weights paper-mnist --family mnist --steps 100 --seeds 20 \
  --tune-seeds 5 --baselines adam --records results/demo/records.jsonl \
  --plot results/demo/curves.png "$@"
