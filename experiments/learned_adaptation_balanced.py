"""Recipe of a default candidate: ``general-v7``'s learned step-size adaptation meta-trained
further on the reweighted group, its meta-learning rate decayed, selected on the validation
group's members alike.

    python experiments/learned_adaptation_balanced.py --steps init,meta-train --procs 2  # resumes
    python experiments/learned_adaptation_balanced.py --steps weights  # the committed run's best
    python experiments/learned_adaptation_balanced.py --dry-run        # print its commands

Run it from the repository root. Why: two findings of the continuations of ``general-v7``'s
adaptation (docs/results.md). At a constant meta-learning rate (3e-2) the iterates' validation
metric moved by up to 5% from one evaluation to the next, and decayed (the annealed run) by
0.8%. And the 8 held-out tasks that select the weights draw the validation group's members
unevenly (three transformer encoders of eight): the annealed run's weights kept by that metric
were no better than ``general-v7`` on other tasks of the validation and meta-training groups
(1.001, 1.016 member by member), its latest ones were (0.987, 0.972). Here the reweighted
recipe (its group, estimator, objective; the LSTM, its read-out and the schedule fixed) runs
from ``general-v7`` with the meta-learning rate 3e-2 decayed to zero on a cosine over 60
iterations, and the weights are selected on 15 held-out tasks, 3 of each validation member
(``--eval-balanced``), told and not (``--eval-untold``); the held-out tasks are split over the
processes, so an evaluation costs what 8 tasks did.

The steps:

1. ``init``: writes ``runs/learned-adaptation-balanced/init.pt``: ``general-v7`` as shipped.
2. ``meta-train``: as above, 60 iterations (about two hours on 2 processes). It resumes from
   ``runs/learned-adaptation-balanced/ckpt``; on a fresh machine it first copies the committed
   checkpoint (``experiments/checkpoints/learned-adaptation-balanced.pt``) there.
3. ``weights`` (not run by default): the committed checkpoint's best weights exported to
   ``runs/learned-adaptation-balanced/weights.pt`` (the sealed test's input on a fresh clone).
4. ``sealed``, only if the best weights are at least 1% below ``general-v7`` (iteration 0) on
   the balanced metric and ahead of it member by member on other seeds of the validation group
   (``benchmarks/member_comparison.py``): the sealed test group at 100 and 1,000 steps, once
   (``SEALED_ARGS="--total-steps --optimizers learned,learned-zeroed" bash
   benchmarks/results/sealed/candidate.sh experiments/learned_adaptation_balanced.py
   learned-adaptation-balanced``; not told the horizon:
   ``learned-adaptation-balanced-horizon-free-{100,1000}``).
5. ``ship`` (not run by default): the committed checkpoint's best weights as the shipped
   ``general-v8``, with their provenance and sealed figures beside ``general-v7``'s; refused
   if their sealed geometric mean is above ``general-v7``'s at either horizon, told or not.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402
import learned_adaptation_reweighted as reweighted  # noqa: E402

NAME = "learned-adaptation-balanced"
SHIPPED, BASE = reweighted.SHIPPED, reweighted.BASE
BASE_SEALED, BASE_SEALED_FREE = reweighted.BASE_SEALED, reweighted.BASE_SEALED_FREE
RUN = Path("runs") / NAME
#: Held-out tasks per evaluation: 3 of each of the validation group's 5 members.
EVAL_TASKS = 15
#: Meta-iterations over which the meta-learning rate (the reweighted run's) decays to zero.
ITERATIONS = 60

#: The reweighted recipe's meta-training command on this run's folders, with the decayed
#: meta-learning rate and the balanced selection.
META_TRAIN = candidates.derived_command(
    reweighted.META_TRAIN, reweighted.RUN, RUN,
    {"--iterations": str(ITERATIONS), "--time-budget": "9000", "--eval-tasks": str(EVAL_TASKS)},
    {"--meta-lr": ["--meta-lr-schedule", "cosine"]},
)  # fmt: skip
META_TRAIN.insert(META_TRAIN.index("--checkpoint-every"), "--eval-balanced")

write_init = reweighted.write_init

RECIPE = candidates.LearnedPartRecipe(
    name=NAME, script="experiments/learned_adaptation_balanced.py",
    description=(__doc__ or "").splitlines()[0], shipped=SHIPPED, base=BASE,
    base_sealed=BASE_SEALED, base_sealed_free=BASE_SEALED_FREE,
    source=f"the shipped {BASE!r} with its learned step-size adaptation meta-trained further "
    "on the reweighted meta-training group at a decaying meta-learning rate, selected on the "
    "validation group's members alike (its LSTM, read-out and schedule fixed)",
    settings={"member_weights": reweighted.MEMBER_WEIGHTS, "meta_lr_schedule": "cosine",
              "iterations": ITERATIONS, "eval_tasks": EVAL_TASKS, "eval_balanced": True},
    start=BASE,
    labels=("learned adaptation, balanced selection",
            f"{BASE!r} meta-trained further, decaying rate, balanced selection",
            "learned outputs zeroed (no adaptation)"),
    write_init=write_init, meta_train=META_TRAIN,
    metric="the meta-trainer's eval/metric: geometric mean of the final training loss over 15 "
    "held-out tasks of the validation group, 3 of each member, at 500 steps, each run told the "
    "horizon and not (30 runs)",
)  # fmt: skip
CHECKPOINT, VALIDATION = RECIPE.checkpoint, RECIPE.validation
ship, main = RECIPE.ship, RECIPE.main

if __name__ == "__main__":
    raise SystemExit(main())
