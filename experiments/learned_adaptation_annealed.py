"""Recipe of a default candidate: the reweighted run of ``general-v7``'s learned step-size
adaptation continued with its meta-learning rate a third as large and decayed to zero.

    python experiments/learned_adaptation_annealed.py --steps init,meta-train --procs 2  # resumes
    python experiments/learned_adaptation_annealed.py --steps weights  # the committed run's best
    python experiments/learned_adaptation_annealed.py --dry-run        # print its commands

Run it from the repository root. Why: the reweighted run (``experiments/
learned_adaptation_reweighted.py``, meta-lr 3e-2) improved on its meta-training group, and its
validation metric moved by up to 5% between iterates 5 apart (0.6591 at iteration 20, 0.6918
at 25): the meta-gradient estimate (4 tasks of 8 antithetic pairs) is noisy, and at a constant
meta-learning rate the weights wander about the region they reached rather than settle in it.
The usual remedy is to decay the step: here the run continues from its latest weights
(iteration 34, the committed checkpoint's) with meta-lr 1e-2 decayed to zero over 30
iterations on a cosine; everything else is the reweighted recipe (its group, estimator,
objective; the LSTM, its read-out and the schedule fixed; selection on the validation tasks
told and not, ``--eval-untold``).

The steps:

1. ``init``: writes ``runs/learned-adaptation-annealed/init.pt``: the latest weights of the
   reweighted run's committed checkpoint.
2. ``meta-train``: as above, at most 30 iterations or 60 minutes. It resumes from
   ``runs/learned-adaptation-annealed/ckpt``; on a fresh machine it first copies the committed
   checkpoint (``experiments/checkpoints/learned-adaptation-annealed.pt``) there.
3. ``weights`` (not run by default): the committed checkpoint's best weights exported to
   ``runs/learned-adaptation-annealed/weights.pt`` (the sealed test's input on a fresh clone).
4. ``sealed``, only if the best weights' validation metric is at least 1% below the reweighted
   candidate's (0.6591, sealed and not better than ``general-v7``; ``general-v7``: 0.6734):
   a smaller difference would seal a rule the sealed group cannot tell from that one. The
   sealed test group at 100 and 1,000 steps, once (``SEALED_ARGS="--total-steps --optimizers
   learned,learned-zeroed" bash benchmarks/results/sealed/candidate.sh
   experiments/learned_adaptation_annealed.py learned-adaptation-annealed``; not told the
   horizon: ``learned-adaptation-annealed-horizon-free-{100,1000}``).
5. ``ship`` (not run by default): the committed checkpoint's best weights as the shipped
   ``general-v8``, with their provenance and sealed figures beside ``general-v7``'s; refused
   if their sealed geometric mean is above ``general-v7``'s at either horizon, told or not.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402
import learned_adaptation_reweighted as reweighted  # noqa: E402

NAME = "learned-adaptation-annealed"
#: The name of the shipped weights.
SHIPPED = reweighted.SHIPPED
#: ``general-v7``'s sealed runs (told the horizon; and not).
BASE_SEALED, BASE_SEALED_FREE = reweighted.BASE_SEALED, reweighted.BASE_SEALED_FREE
RUN = Path("runs") / NAME
#: The shipped weights whose learned adaptation keeps learning.
BASE = reweighted.BASE
#: The run it continues: its committed checkpoint's latest weights are the start.
START = reweighted.CHECKPOINT
#: The meta-learning rate (the reweighted run's: 3e-2), decayed to zero on a cosine over the
#: iterations.
META_LR, ITERATIONS = 1e-2, 30

#: The reweighted recipe's meta-training command on this run's folders, with the decayed
#: meta-learning rate, 60 minutes.
META_TRAIN = candidates.derived_command(
    reweighted.META_TRAIN, reweighted.RUN, RUN,
    {"--meta-lr": str(META_LR), "--iterations": str(ITERATIONS), "--time-budget": "3600"},
    {"--meta-lr": ["--meta-lr-schedule", "cosine"]},
)  # fmt: skip


def write_init(path: Path) -> None:
    """The latest weights of :data:`START` into ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    command = ["-m", "learned_opt", "export", str(START), str(path), "--which", "latest"]
    subprocess.run([sys.executable, *command], check=True)


RECIPE = candidates.LearnedPartRecipe(
    name=NAME, script="experiments/learned_adaptation_annealed.py",
    description=(__doc__ or "").splitlines()[0], shipped=SHIPPED, base=BASE,
    base_sealed=BASE_SEALED, base_sealed_free=BASE_SEALED_FREE,
    source=f"the shipped {BASE!r} with its learned step-size adaptation meta-trained further "
    "on the reweighted meta-training group, then continued with a decayed meta-learning rate "
    "(its LSTM, read-out and schedule fixed)",
    settings={"member_weights": reweighted.MEMBER_WEIGHTS, "meta_lr": META_LR,
              "meta_lr_schedule": "cosine", "iterations": ITERATIONS},
    start="the reweighted run at iteration 34",
    labels=("learned adaptation, annealed meta-learning rate",
            f"{BASE!r}'s adaptation, reweighted run continued at a decayed rate",
            "learned outputs zeroed (no adaptation)"),
    write_init=write_init, meta_train=META_TRAIN, metric=candidates.HELD_OUT_TOLD_AND_UNTOLD,
)  # fmt: skip
ship, main = RECIPE.ship, RECIPE.main
CHECKPOINT, VALIDATION = RECIPE.checkpoint, RECIPE.validation


if __name__ == "__main__":
    raise SystemExit(main())
