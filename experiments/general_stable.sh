#!/usr/bin/env bash
# Issue 4: the general rule with the stabilized step-size adaptation (experiments/stable_adapt.py:
# base lr 0.01, kappa 0.1, adaptation warm-up 5 over 20 steps, shrink 3 below a cosine of -0.2,
# gradient clipping at sqrt(2) x the running RMS, slower growth once the gradient norm has fallen
# 30x; since session 11 also the clip warm-up, C = 3; the session-10 runs had session 9's
# configuration, experiments/stable_adapt.py --config session9), meta-trained from its
# initialization (a zero read-out: exactly that hand-designed optimizer) with full-horizon
# backpropagation (K = T in [50, 100]) on the training loss of diverse-rescaled, weights
# selected on val-ood at 200 steps; then the out-of-distribution benchmark at 100 and 1,000
# steps against the untrained rule.
#
#   bash experiments/general_stable.sh [TIME_BUDGET_SECONDS [META_LR [OUT [OBJECTIVE [KWARGS]]]]]
#
# Defaults: 2400 s, meta-lr 3e-3, runs/general/stable-trained, objective train (or test: the
# held-out loss); KWARGS: more rule options as JSON (e.g. '{"additive": false}'). The read-out
# starts at zero and is scaled by 0.1, so a meta-lr of 3e-4 cannot move the update by more than a
# few percent in the first hundred iterations (the first run, 2026-11-30, without the slowdown:
# flat for 40).
set -euo pipefail
cd "$(dirname "$0")/.."
budget=${1:-2400}
meta_lr=${2:-3e-3}
out=${3:-runs/general/stable-trained}
objective=${4:-train}
extra=${5:-\{\}}
mkdir -p "$out"
# experiments/stable_adapt.py's configuration
kwargs=$(.venv/bin/python -c 'import json, runpy, sys
stable = runpy.run_path("experiments/stable_adapt.py")["STABLE"]
print(json.dumps({"hidden_size": 32, "num_layers": 1, **stable, **json.loads(sys.argv[1])}))' "$extra")

OMP_NUM_THREADS=1 .venv/bin/learned-opt meta-train --family diverse-rescaled --rule general-lstm \
  --rule-kwargs "$kwargs" --horizon 100 --min-horizon 50 --truncation 100 \
  --objective "$objective" --log-meta-loss --meta-lr "$meta_lr" --meta-batch 4 --clip-grad 1.0 \
  --iterations 100000 --time-budget "$budget" --eval-every 10 --eval-tasks 12 \
  --eval-family val-ood --eval-horizon 200 --checkpoint-every 5 --log-dir "$out/tb" \
  --ckpt-dir "$out/ckpt" --export "$out/weights.pt" --resume --quiet > "$out.log" 2>&1

.venv/bin/python experiments/stable_adapt.py --out "$out/untrained"
weights=trained=$out/weights.pt,untrained=$out/untrained/stable.pt
OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ood.py --weights "$weights" --steps 100 --seeds 5 \
  --tune-seeds 3 --out "$out/ood-100" &
OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ood.py --weights "$weights" --steps 1000 --seeds 4 \
  --tune-seeds 2 --out "$out/ood-1000" &
wait
