#!/usr/bin/env bash
# Issue 4, session 12: the seven meta-training runs of the learned correction (README, issue 4,
# "The current configuration on every stream, and why meta-training does not improve it yet").
# Each starts from experiments/stable_adapt.py's current configuration at a zero read-out, with
# only the multiplicative read-out, bounded to e^(+-1); the runs differ in the flags below.
#
#   bash experiments/results/general/session12/meta_train.sh RUN     # RUN = a1 ... a7
#   PRINT=1 bash ... RUN                                              # print the command only
#
# Run from the repository root; logs, checkpoints and weights go to runs/s12/RUN/.
set -euo pipefail
run=${1:?usage: meta_train.sh a1|a2|a3|a4|a5|a6|a7}
rule='"num_layers": 1, "lr": 0.01, "lr_adapt": 0.1, "lr_adapt_bound": 6.907755278982137, "lr_adapt_warmup": 5.0, "lr_adapt_warmup_steps": 20.0, "lr_adapt_shrink": 3.0, "lr_adapt_margin": 0.2, "grad_clip": 2.0, "lr_adapt_slowdown": 30.0, "lr_adapt_slowdown_rate": 0.3, "grad_clip_warmup": 3.0, "additive": false, "a_bound": 1.0'
launch=(.venv/bin/learned-opt meta-train)
family=(--family diverse-rescaled)
hidden=16 learn_lr=', "learn_lr": false' objective=train log=(--log-meta-loss)
unrolls=(--horizon 1000 --min-horizon 100 --truncation 100) budget=3000 every=10
case $run in
  a1) hidden=32 learn_lr='' unrolls=(--horizon 100 --min-horizon 50 --truncation 100)
      budget=2400 every=20 ;;
  a2) learn_lr='' every=20 ;;
  a3) learn_lr='' every=20 objective=test ;;
  a4) ;;
  a5) objective=test ;;
  a6) family+=(--family-kwargs '{"loss_scale_range": [1, 1]}') log=() budget=1800 ;;
  a7) launch=(.venv/bin/torchrun --standalone --nproc_per_node=2 -m learned_opt meta-train)
      unrolls=(--horizon 500 --min-horizon 200 --truncation 500 --grad-checkpoint) budget=2100
      export MALLOC_MMAP_THRESHOLD_=131072 ;;  # freed checkpointing memory goes back (README)
  *) echo "unknown run: $run (a1 ... a7)" >&2; exit 2 ;;
esac
out=runs/s12/$run
cmd=("${launch[@]}" "${family[@]}" --rule general-lstm
  --rule-kwargs "{\"hidden_size\": $hidden, $rule$learn_lr}" "${unrolls[@]}"
  --objective "$objective" "${log[@]}" --meta-lr 3e-3 --meta-batch 4 --clip-grad 1.0
  --iterations 100000 --time-budget "$budget" --eval-every "$every" --eval-tasks 8
  --eval-family val-ood --eval-horizon 500 --checkpoint-every 5 --log-dir "$out/tb"
  --ckpt-dir "$out/ckpt" --export "$out/weights.pt" --resume --quiet)
if [[ -n ${PRINT:-} ]]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
export OMP_NUM_THREADS=1
"${cmd[@]}"
