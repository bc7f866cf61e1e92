"""Recipe of the horizon-aware candidate for the default weights (a run in progress).

    python experiments/horizon_aware.py               # init, meta-train (resumes), sealed test
    python experiments/horizon_aware.py --dry-run     # print its commands, run nothing
    python experiments/horizon_aware.py --steps sealed

Run it from the repository root. The rule is a :class:`~learned_opt.rules.ScheduledRule` (a
learned step-size schedule that reads the step and, when ``total_steps`` is given, the run's
progress) around the shipped default, the LSTM-corrected Adam rule. The steps:

1. ``init``: writes ``runs/horizon-aware/init.pt``: the shipped ``general`` weights under the
   identity schedule (bit-identical steps to ``general``), the run's starting point.
2. ``meta-train``: full unrolls of 100-1,000 steps (horizon drawn log-uniformly per task, one
   truncation window per task, gradient checkpointing) on the ``meta-train-rescaled`` task
   group (MLPs, conv nets with and without batch norm, Elman RNNs, LSTMs, LayerNorm attention,
   regression; random parameter and loss scales); meta-loss: the log-ratio of the held-out loss
   at the end of the run to the starting rule's on the same batches, losses counted twice
   (``--loss-aversion 1``); weights selected on the ``validation`` group. It resumes from
   ``runs/horizon-aware/ckpt``; on a fresh machine it first copies the committed checkpoint
   of the run so far (``experiments/checkpoints/horizon-aware.pt``) there.
3. ``sealed``: the sealed test group (``benchmarks/sealed.py``) at 100 and 1,000 steps with
   ``total_steps`` given, once per candidate.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = Path("runs/horizon-aware")
CHECKPOINT = Path("experiments/checkpoints/horizon-aware.pt")

#: The base rule's configuration, as the run was started with it (the shipped ``general``).
BASE_CONFIG = {
    "hidden_size": 16, "num_layers": 1, "scale_invariant": True, "nominal": True,
    "momentum_betas": [0.5, 0.9, 0.99, 0.999], "beta1": 0.9, "beta2": 0.999, "eps": 1e-08,
    "log_features": True, "additive": False, "lr": 0.01, "learn_lr": False, "a_bound": 1.0,
    "output_scale": 0.1, "preprocess_p": 10.0, "forget_bias": 1.0, "lr_adapt": 0.1,
    "lr_adapt_bound": 6.907755278982137, "lr_adapt_warmup": 5.0, "lr_adapt_warmup_steps": 20.0,
    "lr_adapt_shrink": 3.0, "lr_adapt_margin": 0.2, "grad_clip": 2.0, "grad_clip_warmup": 3.0,
    "grad_clip_aligned": 1.0, "lr_adapt_slowdown": 30.0, "lr_adapt_slowdown_rate": 0.3,
}  # fmt: skip
RULE_KWARGS = {"base": "general-lstm", "base_config": BASE_CONFIG, "hidden": 16, "bound": 3.0}

META_TRAIN = [
    "meta-train", "--family", "meta-train-rescaled", "--rule", "scheduled",
    "--rule-kwargs", json.dumps(RULE_KWARGS), "--init-weights", str(RUN / "init.pt"),
    "--horizon", "1000", "--min-horizon", "100", "--truncation", "1000", "--grad-checkpoint",
    "--objective", "test", "--log-meta-loss", "--loss-aversion", "1", "--meta-lr", "3e-3",
    "--meta-batch", "4", "--clip-grad", "1", "--iterations", "100000", "--time-budget", "20000",
    "--eval-every", "10", "--eval-tasks", "8", "--eval-family", "validation",
    "--eval-horizon", "500", "--checkpoint-every", "2", "--log-dir", str(RUN / "tb"),
    "--ckpt-dir", str(RUN / "ckpt"), "--export", str(RUN / "weights.pt"), "--resume",
]  # fmt: skip


def sealed(steps: int) -> list[str]:
    return [
        "benchmarks/sealed.py", "--weights", str(RUN / "weights.pt"), "--steps", str(steps),
        "--total-steps", "--out", f"benchmarks/results/sealed/horizon-aware-{steps}",
    ]  # fmt: skip


STEPS = ("init", "meta-train", "sealed")


def write_init(path: Path) -> None:
    """The shipped default under the identity schedule."""
    import learned_opt
    from learned_opt import load_rule, save_rule
    from learned_opt.rules import build_rule

    base, _ = load_rule(learned_opt.pretrained.path("general"))
    rule = build_rule("scheduled", RULE_KWARGS)
    rule.base.load_state_dict(base.state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    save_rule(path, rule, {"source": "the shipped 'general' under the identity schedule"})


def restore_checkpoint() -> None:
    """Put the committed checkpoint where ``--resume`` looks, unless the run has newer ones."""
    ckpt_dir = RUN / "ckpt"
    if CHECKPOINT.is_file() and not any(ckpt_dir.glob("ckpt_*.pt")):
        import torch

        iteration = int(torch.load(CHECKPOINT, weights_only=True)["iteration"])
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(CHECKPOINT, ckpt_dir / f"ckpt_{iteration:08d}.pt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default=",".join(STEPS), help="comma list of " + ",".join(STEPS))
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if unknown := sorted(set(steps) - set(STEPS)):
        parser.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    if Path.cwd().resolve() != ROOT and not args.dry_run:
        parser.error(f"run it from the repository root ({ROOT}): its paths are relative to it")
    if "init" in steps:
        print(f"# init: {RUN / 'init.pt'}", flush=True)
        if not args.dry_run:
            write_init(RUN / "init.pt")
    if "meta-train" in steps:
        print(shlex.join(["python", "-m", "learned_opt", *META_TRAIN]), flush=True)
        if not args.dry_run:
            restore_checkpoint()
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
            subprocess.run([sys.executable, "-m", "learned_opt", *META_TRAIN], check=True, env=env)
    if "sealed" in steps:
        for horizon in (100, 1000):
            print(shlex.join(["python", *sealed(horizon)]), flush=True)
            if not args.dry_run:
                subprocess.run([sys.executable, *sealed(horizon)], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
