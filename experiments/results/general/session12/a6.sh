OMP_NUM_THREADS=1 .venv/bin/learned-opt meta-train --family diverse-rescaled --family-kwargs '{"loss_scale_range": [1, 1]}' --rule general-lstm \
  --rule-kwargs '{"hidden_size": 16, "num_layers": 1, "lr": 0.01, "lr_adapt": 0.1, "lr_adapt_bound": 6.907755278982137, "lr_adapt_warmup": 5.0, "lr_adapt_warmup_steps": 20.0, "lr_adapt_shrink": 3.0, "lr_adapt_margin": 0.2, "grad_clip": 2.0, "lr_adapt_slowdown": 30.0, "lr_adapt_slowdown_rate": 0.3, "grad_clip_warmup": 3.0, "additive": false, "a_bound": 1.0, "learn_lr": false}' --horizon 1000 --min-horizon 100 --truncation 100 \
  --objective train --meta-lr 3e-3 --meta-batch 4 --clip-grad 1.0 \
  --iterations 100000 --time-budget 1800 --eval-every 10 --eval-tasks 8 \
  --eval-family val-ood --eval-horizon 500 --checkpoint-every 5 --log-dir runs/s12/a6/tb \
  --ckpt-dir runs/s12/a6/ckpt --export runs/s12/a6/weights.pt --resume --quiet
