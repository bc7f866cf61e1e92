#!/usr/bin/env bash
# Issue 4: the general rule with per-tensor step-size adaptation (lr_adapt), meta-trained on the
# diverse task distribution with its weights selected on `val-ood`, then the out-of-distribution
# benchmark at 100 and 1000 steps with its ablations.
#
#   bash experiments/general_adapt.sh [BUDGET_SECONDS] [HORIZON]   (defaults: 2700, 500)
#
# Meta-training runs on one core (OMP_NUM_THREADS=1). BUDGET counts meta-training time only; the
# held-out evaluations every 10 meta-iterations come on top (about +40% here).
set -euo pipefail
cd "$(dirname "$0")/.."
budget=${1:-2700}
horizon=${2:-500}
out=runs/general/adapt-h$horizon
mkdir -p "$out"
kwargs='{"hidden_size": 32, "num_layers": 1, "lr": 0.01, "lr_adapt": 0.1}'

OMP_NUM_THREADS=1 .venv/bin/learned-opt meta-train --family diverse-rescaled --rule general-lstm \
  --rule-kwargs "$kwargs" --horizon "$horizon" --min-horizon 50 --truncation 20 \
  --objective train --log-meta-loss --meta-lr 3e-4 --meta-batch 4 --clip-grad 1.0 \
  --iterations 5000 --eval-every 10 --eval-tasks 12 --eval-family val-ood --eval-horizon 200 \
  --checkpoint-every 5 --time-budget "$budget" --log-dir "$out/tb" --ckpt-dir "$out/ckpt" \
  --export "$out/weights.pt" --resume --quiet > "$out.log" 2>&1

# ablations of the trained weights: the step-size adaptation switched off, and no meta-training
.venv/bin/python experiments/general_variants.py --weights "$out/weights.pt" --out "$out"

weights=adapt=$out/weights.pt,no-lr-adapt=$out/no-lr-adapt.pt,untrained=$out/untrained.pt
OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ood.py --weights "$weights" --steps 100 --seeds 5 \
  --tune-seeds 3 --out "$out/ood-100" &
OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ood.py --weights "$weights" --steps 1000 --seeds 4 \
  --tune-seeds 2 --out "$out/ood-1000" &
wait
