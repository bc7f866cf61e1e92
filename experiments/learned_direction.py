"""Recipe of a default candidate: ``general-v7`` with a learned turn of each tensor's direction
at its own root mean square, meta-trained from zero.

    python experiments/learned_direction.py --steps init,meta-train --procs 2   # (resumes)
    python experiments/learned_direction.py --steps weights    # the committed run's best
    python experiments/learned_direction.py --dry-run          # print its commands

Run it from the repository root. Why this part: on the validation group ``general-v7``'s learned
step sizes are within 2.2% (told the run's length) and 1.4% (not) of each task's best constant
multiplier at 100 steps, and its LSTM read-out, which scales Adam's direction per coordinate,
changes nothing measurable once zeroed, because the per-tensor step-size adaptation absorbs any
change of a tensor's step length that a per-coordinate scale makes. What is left to learn is
where a tensor moves. ``direction_correction`` adds a third read-out of the LSTM, a
per-coordinate term added to the direction, and rescales the sum to the direction's own root
mean square over the tensor (Celo2's per-step RMS normalization of the learned update, here
around the hand-designed direction): the read-out can only turn the step, never lengthen it.
Its 17 weights start at zero (``general-v7`` step for step); only they are meta-trained.

The steps:

1. ``init``: writes ``runs/learned-direction/init.pt``: ``general-v7`` with the correction
   read-out at zero.
2. ``meta-train``: ``experiments/learned_adaptation_untold.py``'s meta-training (``general-v7``'s
   estimator, objective and tasks: persistent evolution strategies over whole unrolls of
   100-1,000 steps, 8 antithetic pairs, sigma 0.1, a perturbation turning each coordinate's
   direction by about a fifth of its size; half of the runs not told their length; weights
   selected on the validation tasks run told and not) on the correction's weights alone
   (``--train-only base.correction_``), 60 minutes. It resumes from
   ``runs/learned-direction/ckpt``; on a fresh machine it first copies the committed
   checkpoint (``experiments/checkpoints/learned-direction.pt``) there.
3. ``weights`` (not run by default): the committed checkpoint's best weights exported to
   ``runs/learned-direction/weights.pt`` (the sealed test's input on a fresh clone).
4. ``sealed``, only if the best weights' validation metric (final training loss at 500 steps,
   8 validation tasks told and not) is at least 1% below that of ``general-v7`` (the run's
   iteration 0; ``benchmarks/selection_noise.py`` measures the 8-task metric's noise at 0.8% on
   this group) and the ``direction correction zeroed`` ablation of ``benchmarks/ablations.py``
   at 100 and 500 steps is at least 1% worse than the weights as given: the sealed test group
   at 100 and 1,000 steps, once (``SEALED_ARGS="--total-steps --optimizers
   learned,learned-zeroed" bash benchmarks/results/sealed/candidate.sh
   experiments/learned_direction.py learned-direction``; not told the horizon:
   ``learned-direction-horizon-free-{100,1000}``).
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

NAME = "learned-direction"
#: What it changes in ``general-v7``'s configuration.
SETTINGS = {"direction_correction": True}

#: The untold recipe's meta-training on this run's folders, the correction's weights alone,
#: 60 minutes.
META_TRAIN = candidates.derived_command(
    untold.META_TRAIN, untold.RUN, Path("runs") / NAME, {"--time-budget": "3600"},
    {"--init-weights": ["--train-only", "base.correction_"]},
)  # fmt: skip


def initial_rule():
    """``general-v7`` with the direction correction's read-out at zero."""
    import learned_opt
    from learned_opt import load_rule

    start, _ = load_rule(learned_opt.pretrained.path(untold.BASE))
    added = ["base.correction_bias", "base.correction_weight"]
    return candidates.with_new_part(start, SETTINGS, added)


def write_init(path: Path) -> None:
    source = f"the shipped {untold.BASE!r} with a zero direction correction"
    candidates.write_start(path, initial_rule(), source)


RECIPE = candidates.LearnedPartRecipe(
    name=NAME, script="experiments/learned_direction.py",
    description=(__doc__ or "").splitlines()[0], shipped=untold.SHIPPED, base=untold.BASE,
    base_sealed=untold.BASE_SEALED, base_sealed_free=untold.BASE_SEALED_FREE,
    source=f"the shipped {untold.BASE!r} with a learned turn of each tensor's direction at its "
    "own root mean square (the correction's read-out meta-trained from zero; everything else "
    "fixed)",
    settings=SETTINGS, start=untold.BASE,
    labels=("learned direction correction",
            f"{untold.BASE!r} with its direction turned by a learned read-out",
            "learned outputs zeroed (no adaptation, no correction)"),
    write_init=write_init, meta_train=META_TRAIN, metric=candidates.HELD_OUT_TOLD_AND_UNTOLD,
)  # fmt: skip
ship, main = RECIPE.ship, RECIPE.main
CHECKPOINT, VALIDATION, SHIPPED = RECIPE.checkpoint, RECIPE.validation, RECIPE.shipped
BASE_SEALED, BASE_SEALED_FREE = RECIPE.base_sealed, RECIPE.base_sealed_free


if __name__ == "__main__":
    raise SystemExit(main())
