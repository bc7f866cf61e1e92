#!/usr/bin/env bash
# Issue 4, session 13: meta-training the learned correction with the loss-averse objective
# (MetaTrainConfig.loss_aversion): a window's meta-loss is log(L / L_ref) against the starting
# rule (experiments/stable_adapt.py's current configuration at a zero read-out), times 1 + lambda
# where positive. Otherwise session 12's a7 recipe (full unrolls T = K in [200, 500], gradient
# checkpointing, 2 processes), multiplicative read-out only, bounded to e^(+-1).
#
#   bash experiments/results/general/session13/meta_train.sh RUN     # RUN = b1 ...
#   PRINT=1 bash ... RUN                                              # print the command only
#
# Run from the repository root; logs, checkpoints and weights go to runs/s13/RUN/.
set -euo pipefail
run=${1:?usage: meta_train.sh b1}
rule='"num_layers": 1, "lr": 0.01, "lr_adapt": 0.1, "lr_adapt_bound": 6.907755278982137, "lr_adapt_warmup": 5.0, "lr_adapt_warmup_steps": 20.0, "lr_adapt_shrink": 3.0, "lr_adapt_margin": 0.2, "grad_clip": 2.0, "lr_adapt_slowdown": 30.0, "lr_adapt_slowdown_rate": 0.3, "grad_clip_warmup": 3.0, "additive": false, "a_bound": 1.0, "learn_lr": false'
case $run in
  b1) aversion=3 budget=2400 ;;
  *) echo "unknown run: $run (b1)" >&2; exit 2 ;;
esac
out=runs/s13/$run
cmd=(.venv/bin/torchrun --standalone --nproc_per_node=2 -m learned_opt meta-train
  --family diverse-rescaled --rule general-lstm --rule-kwargs "{\"hidden_size\": 16, $rule}"
  --horizon 500 --min-horizon 200 --truncation 500 --grad-checkpoint
  --objective train --log-meta-loss --loss-aversion "$aversion"
  --meta-lr 3e-3 --meta-batch 4 --clip-grad 1.0
  --iterations 100000 --time-budget "$budget" --eval-every 20 --eval-tasks 8
  --eval-family val-ood --eval-horizon 500 --checkpoint-every 5 --log-dir "$out/tb"
  --ckpt-dir "$out/ckpt" --export "$out/weights.pt" --resume --quiet)
if [[ -n ${PRINT:-} ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
export OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=131072  # freed checkpointing memory goes back
"${cmd[@]}"
