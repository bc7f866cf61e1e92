#!/usr/bin/env bash
# Set up (if needed), then the main job: shipped LSTMOptimizers against Adam with a tuned learning
# rate on the paper's MNIST task (784-20-10 sigmoid MLP, batch 128, 100 steps), 20 seeds: the
# default weights (`general-v7`, meta-trained on a diverse task distribution) as a drop-in, the
# same told the run's length (`total_steps=100`: its warm-up and decay), and the paper's
# (`paper-mnist`, meta-trained on this task). Prints the tables; writes
# results/demo/<run>/records.jsonl and results/demo/<run>/curves.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
demo() {  # <results folder> <title> <weights> [eval options]
  local run=$1 title=$2 weights=$3
  shift 3
  echo "== $title vs tuned Adam =="
  .venv/bin/learned-opt eval --weights "$weights" --family mnist --steps 100 --seeds 20 \
    --tune-seeds 5 --baselines adam --records "results/demo/$run/records.jsonl" \
    --plot "results/demo/$run/curves.png" "$@"
}
demo general-v7 'LSTMOptimizer(params)' general-v7 "$@"
demo general-v7-total-steps 'LSTMOptimizer(params, total_steps=100)' general-v7 --total-steps "$@"
demo paper-mnist 'LSTMOptimizer(params, weights="paper-mnist")' paper-mnist "$@"
