OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=131072 .venv/bin/torchrun --standalone --nproc_per_node=2 -m learned_opt meta-train --family diverse-rescaled --rule general-lstm \
  --rule-kwargs '{"hidden_size": 16, "num_layers": 1, "lr": 0.01, "lr_adapt": 0.1, "lr_adapt_bound": 6.907755278982137, "lr_adapt_warmup": 5.0, "lr_adapt_warmup_steps": 20.0, "lr_adapt_shrink": 3.0, "lr_adapt_margin": 0.2, "grad_clip": 2.0, "lr_adapt_slowdown": 30.0, "lr_adapt_slowdown_rate": 0.3, "grad_clip_warmup": 3.0, "additive": false, "a_bound": 1.0, "learn_lr": false}' --horizon 500 --min-horizon 200 --truncation 500 --grad-checkpoint \
  --objective train --log-meta-loss --meta-lr 3e-3 --meta-batch 4 --clip-grad 1.0 \
  --iterations 100000 --time-budget 2100 --eval-every 10 --eval-tasks 8 \
  --eval-family val-ood --eval-horizon 500 --checkpoint-every 5 --log-dir runs/s12/a7/tb \
  --ckpt-dir runs/s12/a7/ckpt --export runs/s12/a7/weights.pt --resume --quiet
