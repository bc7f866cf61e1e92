"""Recipe of a default candidate: the learned step-size adaptation told each tensor's size, from
the learned-schedule candidate's weights, the size's weights meta-trained from zero.

    python experiments/learned_adaptation_size.py --steps init,meta-train --procs 2   # (resumes)
    python experiments/learned_adaptation_size.py --steps weights    # the committed run's best
    python experiments/learned_adaptation_size.py --dry-run          # print its commands

Run it from the repository root. Why: ``general-v7``'s learned adaptation (``lr_adapt_learned``)
reads only scale-free statistics of a tensor's gradients and the step count, so over its first
steps every tensor's step size moves alike, whatever the tensor; a bias of 10 coordinates and a
matrix of 10^5 start and grow their steps the same way. ``controller_size`` gives the
adaptation each tensor's log size as a seventh input, through 9 weights of its own that start at
zero (the rule unchanged). Only those 9 weights are meta-trained here; the rest is the best
weights of ``experiments/learned_late_decay_smoothed.py`` (``general-v7`` with its warm-up and
decay learned from nothing, told the run's length and not), so that zeroing the learned
outputs removes the schedule as well as the adaptation.

The steps:

1. ``init``: writes ``runs/learned-adaptation-size/init.pt``: the learned-schedule candidate's
   best weights (``experiments/checkpoints/learned-late-decay-smoothed.pt``) with the size
   input at zero.
2. ``meta-train``: ``experiments/learned_adaptation_untold.py``'s meta-training (``general-v7``'s
   estimator, objective and tasks; half of the runs not told their length; weights selected on
   the validation tasks run told and not), on the size's weights alone
   (``--train-only base.controller_size_``), 50 minutes. It resumes from
   ``runs/learned-adaptation-size/ckpt``; on a fresh machine it first copies the committed
   checkpoint (``experiments/checkpoints/learned-adaptation-size.pt``) there.
3. ``weights`` (not run by default): the committed checkpoint's best weights exported to
   ``runs/learned-adaptation-size/weights.pt`` (the sealed test's input on a fresh clone).
4. ``sealed``, only if the best weights' validation metric is at least 1% below that of the
   weights it starts from (the run's iteration 0, 0.6658; the learned-schedule candidate,
   sealed before, is itself 1.1% below ``general-v7``'s 0.6734 on this metric, recorded by
   ``experiments/learned_adaptation_untold.py`` at its start, and did not beat it on the
   sealed group) and ahead of both in ``benchmarks/member_comparison.py`` on other
   validation seeds: the sealed test group at 100 and 1,000 steps, once (``SEALED_ARGS=
   "--total-steps --optimizers learned,learned-zeroed" bash benchmarks/results/sealed/candidate.sh
   experiments/learned_adaptation_size.py learned-adaptation-size``; not told the horizon:
   ``learned-adaptation-size-horizon-free-{100,1000}``).
5. ``ship`` (not run by default): the committed checkpoint's best weights as the shipped
   ``general-v8``, with their provenance and sealed figures beside ``general-v7``'s; refused
   if their sealed geometric mean is above ``general-v7``'s at either horizon, told or not.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402
import learned_adaptation_untold as untold  # noqa: E402
import learned_late_decay_smoothed as smoothed  # noqa: E402

NAME = "learned-adaptation-size"
#: The weights it starts from: the learned-schedule candidate's best.
START = smoothed.CHECKPOINT
#: What it changes in their configuration.
SETTINGS = {"controller_size": True}

#: The untold recipe's meta-training on this run's folders, the size's weights alone, 50 minutes.
META_TRAIN = candidates.derived_command(
    untold.META_TRAIN, untold.RUN, Path("runs") / NAME, {"--time-budget": "3000"},
    {"--init-weights": ["--train-only", "base.controller_size_"]},
)  # fmt: skip


def initial_rule():
    """The learned-schedule candidate's best weights with the size input at zero."""
    from learned_opt import load_rule

    start, _ = load_rule(START, which="best")
    added = ["base.controller_size_linear", "base.controller_size_w"]
    return candidates.with_new_part(start, SETTINGS, added)


def write_init(path: Path) -> None:
    source = f"the best weights of {START} with the learned adaptation's size input at zero"
    candidates.write_start(path, initial_rule(), source)


RECIPE = candidates.LearnedPartRecipe(
    name=NAME, script="experiments/learned_adaptation_size.py",
    description=(__doc__ or "").splitlines()[0], shipped=untold.SHIPPED, base=untold.BASE,
    base_sealed=untold.BASE_SEALED, base_sealed_free=untold.BASE_SEALED_FREE,
    source=f"{untold.BASE!r} with its warm-up and decay learned from nothing (the best weights "
    f"of {START}) and its learned step-size adaptation told each tensor's size (the size's "
    "weights meta-trained from zero; everything else fixed)",
    settings=SETTINGS, start="learned_late_decay_smoothed",
    labels=("learned adaptation told the tensor's size",
            "the learned-schedule candidate with the size input meta-trained",
            "learned outputs zeroed (no schedule, no adaptation)"),
    write_init=write_init, meta_train=META_TRAIN, metric=candidates.HELD_OUT_TOLD_AND_UNTOLD,
)  # fmt: skip
ship, main = RECIPE.ship, RECIPE.main
CHECKPOINT, SHIPPED = RECIPE.checkpoint, RECIPE.shipped
BASE_SEALED, BASE_SEALED_FREE = RECIPE.base_sealed, RECIPE.base_sealed_free


if __name__ == "__main__":
    raise SystemExit(main())
