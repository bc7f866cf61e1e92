"""Recipe of a default candidate: ``general-v6`` with a learned per-tensor mix of Adam's and Muon's
directions.

    python experiments/orthogonal_mix.py --steps init,meta-train --procs 2   # meta-train (resumes)
    python experiments/orthogonal_mix.py --steps validate   # best weights vs their mix zeroed
    python experiments/orthogonal_mix.py --steps weights    # the committed run's best weights
    python experiments/orthogonal_mix.py --dry-run          # print its commands, run nothing
    python experiments/orthogonal_mix.py --family meta-train-noisy ...  # on the noisy group

Run it from the repository root. Why this part: ``general-v6``'s LSTM read-out (meta-trained
around Adam's direction) changes nothing measurable once zeroed, because the hand-designed
per-tensor step-size adaptation absorbs any change of a tensor's step size that a per-coordinate
correction makes. A matrix's *direction* is what the adaptation cannot undo, and which one is
better depends on the tensor: on the validation group Muon's direction gains 11% over Adam's at
1,000 steps in geometric mean, and Muon recipes keep Adam's for embeddings and output layers.
So the learned part here is a second read-out of the (fixed) LSTM, averaged over each matrix,
that mixes the two directions (``LSTMCorrectedAdamConfig.orthogonal_mix``): 17 weights, at zero
at the start (``general-v6`` step for step), meta-trained with the LSTM, its first read-out,
the hand-designed adaptation and the schedule fixed.

The steps:

1. ``init``: writes ``runs/orthogonal-mix/init.pt``: ``general-v6`` with the mix read-out at
   zero (``learn_lstm=False``, ``learn_schedule=False``).
2. ``meta-train``: persistent evolution strategies over whole unrolls of 100-1,000 steps (the
   horizon drawn log-uniformly per task and told to the rule; one window per task: unbiased for
   the smoothed objective of the whole run; 8 antithetic pairs, sigma 0.3: a perturbation moves
   a tensor's mix by about a quarter) on the ``meta-train`` group (MLPs, conv nets with and
   without batch norm, Elman RNNs, LSTMs, LayerNorm attention, regression), or with
   ``--family meta-train-noisy`` on the same with label noise (``runs/orthogonal-mix-noisy``,
   ``experiments/checkpoints/orthogonal-mix-noisy.pt``, and so on; ``--sigma 0.03`` adds
   ``-sigma0.03`` to the names); meta-loss: the log of the final training loss; each task's
   estimate clipped before the mean; weights selected on the ``validation`` group (final
   training loss at 500 steps, the horizon told). It resumes from ``runs/orthogonal-mix/ckpt``;
   on a fresh machine it first copies the committed checkpoint
   (``experiments/checkpoints/orthogonal-mix.pt``) there. ``--procs N`` runs it under
   ``torchrun`` with N processes of one thread.
3. ``validate`` (not run by default): the run's best weights (exported to
   ``runs/orthogonal-mix/weights.pt``) against the same rule with its read-outs zeroed
   (``general-v6``, step for step) with ``benchmarks/sealed.py --group validation
   --total-steps`` (5 members x 5 seeds, ratios to Adam tuned on 2 other seeds) at 100 and
   1,000 steps, one process per horizon (``benchmarks/results/validation/orthogonal-mix/``).
4. ``weights`` (not run by default): the best weights of the committed checkpoint exported to
   ``runs/orthogonal-mix/weights.pt`` (the sealed test's input on a fresh clone).
5. ``sealed``: the sealed test group (``benchmarks/sealed.py``) at 100 and 1,000 steps, once
   (``SEALED_ARGS=--total-steps bash benchmarks/results/sealed/candidate.sh
   experiments/orthogonal_mix.py orthogonal-mix``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402

#: The shipped weights the mix is learned around.
BASE = "general-v6"
#: The meta-training groups a run may use, with the name of its run folder, committed
#: checkpoint and validation results: the ``meta-train`` group, and the same with a fifth of
#: each classification task's training labels replaced (a noise floor, as the validation and
#: sealed test groups have; ``learned_opt.tasks.label_noise``).
NAMES = {"meta-train": "orthogonal-mix", "meta-train-noisy": "orthogonal-mix-noisy"}


#: PES's perturbation scale of the committed runs: it moves a matrix's mix by about 0.3 either
#: way, over which the objective (least at Muon's direction, t = 0, and worse by 3-6% at
#: t = +-0.3) slopes towards Adam's side: the learned mix drifts there. ``--sigma 0.03`` follows
#: the objective itself.
SIGMA = 0.3


def name(family: str = "meta-train", sigma: float = SIGMA) -> str:
    """The run's name: the group's, with the perturbation scale if it is not :data:`SIGMA`."""
    return NAMES[family] + ("" if sigma == SIGMA else f"-sigma{sigma:g}")


def run_dir(family: str = "meta-train", sigma: float = SIGMA) -> Path:
    return Path("runs") / name(family, sigma)


def checkpoint_path(family: str = "meta-train", sigma: float = SIGMA) -> Path:
    return Path("experiments/checkpoints") / f"{name(family, sigma)}.pt"


def validation_dir(family: str = "meta-train", sigma: float = SIGMA) -> Path:
    return Path("benchmarks/results/validation") / name(family, sigma)


def meta_train_command(family: str = "meta-train", sigma: float = SIGMA) -> list[str]:
    """The meta-training command (after ``python -m learned_opt``) on ``family``."""
    run = run_dir(family, sigma)
    return [
        "meta-train", "--family", family, "--rule", "scheduled",
        "--init-weights", str(run / "init.pt"),
        "--horizon", "1000", "--min-horizon", "100", "--truncation", "1000",
        "--objective", "final-train", "--log-meta-loss",
        "--estimator", "pes", "--estimator-kwargs", json.dumps({"sigma": sigma, "pairs": 8}),
        "--clip-grad-per-task", "--meta-lr", "3e-2", "--meta-batch", "4", "--clip-grad", "1",
        "--iterations", "100000", "--time-budget", "20000", "--eval-every", "5",
        "--eval-tasks", "8", "--eval-family", "validation", "--eval-horizon", "500",
        "--checkpoint-every", "1", "--log-dir", str(run / "tb"), "--ckpt-dir", str(run / "ckpt"),
        "--export", str(run / "weights.pt"), "--resume",
    ]  # fmt: skip


#: The committed run's (on ``meta-train``).
RUN, CHECKPOINT, VALIDATION = run_dir(), checkpoint_path(), validation_dir()
META_TRAIN = meta_train_command()


def initial_rule():
    """``general-v6`` (LSTM, read-out, adaptation and schedule fixed) with a zero mix read-out."""
    import learned_opt
    from learned_opt import load_rule
    from learned_opt.rules import build_rule

    base, _ = load_rule(learned_opt.pretrained.path(BASE))
    config = base.config()
    config["base_config"] = {**config["base_config"], "orthogonal_mix": True, "learn_lstm": False}
    config["learn_schedule"] = False
    rule = build_rule(base.kind, config)
    missing = rule.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["base.mix_bias", "base.mix_weight"], missing
    return rule


def write_init(path: Path) -> None:
    from learned_opt import save_rule

    path.parent.mkdir(parents=True, exist_ok=True)
    save_rule(path, initial_rule(), {"source": f"the shipped {BASE!r} with a zero mix read-out"})


def validation_command(steps: int, out: Path = VALIDATION, run: Path = RUN) -> list[str]:
    """The validation run (after ``python``) of ``run/weights.pt`` at ``steps``."""
    return candidates.validation_command(run, steps, out)


def validate(out: Path = VALIDATION, run: Path = RUN) -> dict[int, dict[str, float]]:
    """Both horizons side by side (one process each); writes ``out/table.md``."""
    return candidates.validate_against_zeroed(
        out, run, "learned mix", "The learned mix of Adam's and Muon's directions",
        "read-outs zeroed (`general-v6`)",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    candidates.add_arguments(parser)
    parser.add_argument("--family", choices=sorted(NAMES), default="meta-train",
                        help="the meta-training group (default: meta-train)")  # fmt: skip
    parser.add_argument("--sigma", type=float, default=SIGMA,
                        help=f"PES's perturbation scale (default {SIGMA})")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.sigma > 0:
        parser.error(f"--sigma must be > 0, got {args.sigma}")
    family, sigma = args.family, args.sigma
    run, checkpoint_file = run_dir(family, sigma), checkpoint_path(family, sigma)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    for step, checkpoint in (("validate", None), ("weights", checkpoint_file)):
        if step in steps:
            command = candidates.export_best(run, checkpoint)
            print(shlex.join(["python", *command]), flush=True)
            if not args.dry_run:
                subprocess.run([sys.executable, *command], check=True)
                if step == "validate":
                    validate(validation_dir(family, sigma), run)
    shared = [s for s in steps if s not in ("validate", "weights")]
    if shared or not steps:
        args.steps = ",".join(shared)
        candidates.run_steps(
            args, parser, run=run, checkpoint=checkpoint_file, write_init=write_init,
            meta_train=meta_train_command(family, sigma),
            sealed=candidates.sealed_command(run, name(family, sigma)),
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
