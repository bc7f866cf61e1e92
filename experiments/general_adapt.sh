#!/usr/bin/env bash
# Issue 4: the general rule with per-tensor step-size adaptation (lr_adapt), meta-trained on the
# diverse task distribution with full-horizon backpropagation (K = T, no truncation bias) and its
# weights selected on `val-ood`, then the out-of-distribution benchmark at 100 and 1000 steps
# with two ablations of the selected weights.
#
#   bash experiments/general_adapt.sh [ITERATIONS]   (default 120: the run of 2026-11-30)
#
# Meta-training runs on one core (OMP_NUM_THREADS=1): 120 meta-iterations took 698 s of
# meta-training plus the held-out evaluations every 10 (about 25 min in all); the two benchmarks
# run side by side, about 20 min.
set -euo pipefail
cd "$(dirname "$0")/.."
iterations=${1:-120}
out=runs/general/adapt
mkdir -p "$out"
kwargs='{"hidden_size": 32, "num_layers": 1, "lr": 0.01, "lr_adapt": 0.1}'

OMP_NUM_THREADS=1 .venv/bin/learned-opt meta-train --family diverse-rescaled --rule general-lstm \
  --rule-kwargs "$kwargs" --horizon 100 --min-horizon 50 --truncation 100 \
  --objective train --log-meta-loss --meta-lr 3e-4 --meta-batch 4 --clip-grad 1.0 \
  --iterations "$iterations" --eval-every 10 --eval-tasks 12 --eval-family val-ood \
  --eval-horizon 200 --checkpoint-every 5 --log-dir "$out/tb" --ckpt-dir "$out/ckpt" \
  --export "$out/weights.pt" --resume --quiet > "$out.log" 2>&1

# ablations of the trained weights: the step-size adaptation switched off, and no meta-training
.venv/bin/python experiments/general_variants.py --weights "$out/weights.pt" --out "$out"

weights=adapt=$out/weights.pt,no-lr-adapt=$out/no-lr-adapt.pt,untrained=$out/untrained.pt
OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ood.py --weights "$weights" --steps 100 --seeds 5 \
  --tune-seeds 3 --out "$out/ood-100" &
OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ood.py --weights "$weights" --steps 1000 --seeds 4 \
  --tune-seeds 2 --out "$out/ood-1000" &
wait
