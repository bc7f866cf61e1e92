#!/usr/bin/env bash
# Issue 4: meta-train the general rule and its ablations on the diverse task distribution, then
# run the out-of-distribution benchmark on all of them against one tuned Adam.
#
#   bash experiments/general_ablation.sh [BUDGET_SECONDS]    (default 1800 per variant)
#
# Each variant runs on one core (OMP_NUM_THREADS=1); run two at a time on a 2-core machine.
# The figures in the README came from BUDGET=1800 for "full" and "no-nominal" and
# `--iterations 85` (the count those reached) for "no-scale-invariant" and "no-rescale".
set -euo pipefail
cd "$(dirname "$0")/.."
budget=${1:-1800}
out=runs/general
mkdir -p "$out"
base='"hidden_size": 32, "num_layers": 1, "lr": 0.003'

train() {  # NAME FAMILY RULE_KWARGS
  OMP_NUM_THREADS=1 .venv/bin/learned-opt meta-train --family "$2" --rule general-lstm \
    --rule-kwargs "$3" --horizon 200 --min-horizon 50 --truncation 20 --objective test \
    --log-meta-loss --meta-lr 1e-3 --meta-batch 4 --clip-grad 1.0 --iterations 5000 \
    --eval-every 20 --eval-tasks 12 --checkpoint-every 5 --time-budget "$budget" \
    --log-dir "$out/$1/tb" --ckpt-dir "$out/$1/ckpt" --export "$out/$1/weights.pt" --resume \
    --quiet > "$out/$1.log" 2>&1
}

train full diverse-rescaled "{$base}" &
train no-nominal diverse-rescaled "{$base, \"nominal\": false}" &
wait
train no-scale-invariant diverse-rescaled "{$base, \"scale_invariant\": false}" &
train no-rescale diverse "{$base}" &
wait

weights=full=$out/full/weights.pt,no-nominal=$out/no-nominal/weights.pt
weights=$weights,no-scale-invariant=$out/no-scale-invariant/weights.pt
weights=$weights,no-rescale=$out/no-rescale/weights.pt,paper=paper-mnist
.venv/bin/python benchmarks/ood.py --weights "$weights" --steps 100,1000 --seeds 5 \
  --tune-seeds 3 --out "$out/ood"
