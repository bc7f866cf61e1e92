"""Recipe of the horizon-aware candidates for the default weights (runs in progress).

    python experiments/horizon_aware.py               # init, meta-train (resumes), sealed test
    python experiments/horizon_aware.py --dry-run     # print its commands, run nothing
    python experiments/horizon_aware.py --steps sealed
    python experiments/horizon_aware.py --objective final-train --procs 2   # the second run
    python experiments/horizon_aware.py --objective final-train --procs 2 --meta-gradient pes

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
   ``--objective final-train`` is a second run (``runs/horizon-aware-final-train``, checkpoint
   ``experiments/checkpoints/horizon-aware-final-train.pt``) whose meta-loss and selection use
   the *training* loss at the end of the run, the loss the sealed test reports: the first run's
   schedule learned mostly a smaller step, which the held-out loss rewards on small tasks.
   ``--meta-gradient`` chooses how the meta-gradient is estimated; each choice is a run of its
   own (folder and checkpoint suffixed with it). ``first-order`` (the two runs above):
   backpropagation of whole unrolls, the optimizee's gradients treated as constants.
   ``second-order``: exact gradients of 50-step truncation windows (meta-lr 1e-3), each task's
   clipped before the mean: ``benchmarks/meta_gradient_bias.py`` finds the first-order gradient
   pointing uphill on 3 of 4 smooth tasks at 20 steps, and whole unrolls of 100 steps or more
   chaotic (single windows' gradient norms reach thousands, which would steer a plain mean
   alone). ``pes``: persistent evolution strategies over 50-step windows (8 antithetic pairs,
   sigma 0.01), unbiased for the smoothed objective of the whole unroll, which neither chaos nor
   the discontinuities of the rule's step-size adaptation stop; no loss aversion (PES does not
   support it).
   ``--procs N`` runs the meta-training under ``torchrun`` with N processes of one thread.
3. ``sealed``: the sealed test group (``benchmarks/sealed.py``) at 100 and 1,000 steps with
   ``total_steps`` given, once per candidate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402

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

#: Per meta-objective: the run's folder and its committed checkpoint.
RUNS = {
    "test": (RUN, CHECKPOINT),
    "final-train": (
        Path("runs/horizon-aware-final-train"),
        Path("experiments/checkpoints/horizon-aware-final-train.pt"),
    ),
}


#: How the meta-gradient is estimated (``--meta-gradient``).
META_GRADIENTS = ("first-order", "second-order", "pes")


def run_paths(objective: str = "test", method: str = "first-order") -> tuple[Path, Path]:
    """The run folder and committed checkpoint of the run of ``objective`` and ``method``."""
    run, checkpoint = RUNS[objective]
    if method == "first-order":
        return run, checkpoint
    if method not in META_GRADIENTS:
        raise ValueError(f"unknown meta-gradient {method!r}; choose from {META_GRADIENTS}")
    return run.with_name(f"{run.name}-{method}"), checkpoint.with_name(
        f"{checkpoint.stem}-{method}.pt"
    )


def meta_train(objective: str = "test", method: str = "first-order") -> list[str]:
    """The meta-training command (after ``python -m learned_opt``) of the run of ``objective``
    whose meta-gradients ``method`` estimates (:data:`META_GRADIENTS`)."""
    run = run_paths(objective, method)[0]
    # second order and PES: 50-step windows (a gradient is smooth at that length; whole unrolls
    # of 100+ steps are chaotic, see docs/results.md), one meta-step per window round
    first = method == "first-order"
    truncation, meta_lr = ("1000", "3e-3") if first else ("50", "1e-3")
    estimator = {
        "first-order": ["--loss-aversion", "1"],
        "second-order": ["--loss-aversion", "1", "--second-order", "--clip-grad-per-task"],
        "pes": ["--estimator", "pes", "--estimator-kwargs", json.dumps({"sigma": 0.01, "pairs": 8}),
                "--clip-grad-per-task"],
    }[method]  # fmt: skip
    return [
        "meta-train", "--family", "meta-train-rescaled", "--rule", "scheduled",
        "--rule-kwargs", json.dumps(RULE_KWARGS), "--init-weights", str(run / "init.pt"),
        "--horizon", "1000", "--min-horizon", "100", "--truncation", truncation,
        *(["--grad-checkpoint"] if method != "pes" else []),
        "--objective", objective, "--log-meta-loss", *estimator, "--meta-lr", meta_lr,
        "--meta-batch", "4", "--clip-grad", "1", "--iterations", "100000",
        "--time-budget", "20000", "--eval-every", "10", "--eval-tasks", "8",
        "--eval-family", "validation", "--eval-horizon", "500", "--checkpoint-every", "2",
        "--log-dir", str(run / "tb"), "--ckpt-dir", str(run / "ckpt"),
        "--export", str(run / "weights.pt"), "--resume",
    ]  # fmt: skip


META_TRAIN = meta_train("test")


def sealed(steps: int, objective: str = "test", method: str = "first-order") -> list[str]:
    run = run_paths(objective, method)[0]
    return [
        "benchmarks/sealed.py", "--weights", str(run / "weights.pt"), "--steps", str(steps),
        "--total-steps", "--out", f"benchmarks/results/sealed/{run.name}-{steps}",
    ]  # fmt: skip


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    candidates.add_arguments(parser)
    parser.add_argument("--objective", default="test", choices=sorted(RUNS), help="which run")
    parser.add_argument(
        "--meta-gradient", default="first-order", choices=META_GRADIENTS,
        help="how meta-gradients are estimated (each its own run)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    objective, method = args.objective, args.meta_gradient
    run, checkpoint = run_paths(objective, method)
    return candidates.run_steps(
        args, parser, run=run, checkpoint=checkpoint, write_init=write_init,
        meta_train=meta_train(objective, method),
        sealed=lambda steps: sealed(steps, objective, method),
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
