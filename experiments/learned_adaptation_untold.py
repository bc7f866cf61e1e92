"""Recipe of a default candidate: ``general-v7``'s learned step-size adaptation meta-trained
further, told the run's length on half of the tasks and not on the other half.

    python experiments/learned_adaptation_untold.py --steps init,meta-train --procs 2   # (resumes)
    python experiments/learned_adaptation_untold.py --steps weights    # the committed run's best
    python experiments/learned_adaptation_untold.py --dry-run          # print its commands

Run it from the repository root. Why: ``general-v7``'s adaptation (``lr_adapt_learned``, 71
weights; see ``experiments/learned_adaptation.py``) was meta-trained with every task told its
horizon, so always beside the fixed warm-up and late decay that telling switches on. Used as a
drop-in optimizer it is most often not told, and there its learned part is worth less at 100
steps (7.4% over the same rule with its learned outputs zeroed, on the sealed group, against
10.8% told). Here the same weights keep learning with a task's horizon withheld half of the
time (``--untold-fraction 0.5``; the adaptation does not read the horizon, so one set of weights
serves both uses), and the best weights are selected on the validation group run both told and
not (``--eval-untold``). The LSTM, its read-out and the schedule stay at ``general-v7``'s.

The steps:

1. ``init``: writes ``runs/learned-adaptation-untold/init.pt``: ``general-v7`` as shipped.
2. ``meta-train``: ``experiments/learned_adaptation.py``'s estimator, objective and meta-training
   group (persistent evolution strategies over whole unrolls of 100-1,000 steps, the horizon
   drawn log-uniformly per task; 8 antithetic pairs, sigma 0.1; meta-lr 3e-2; ``meta-train``
   rescaled, a fifth of the training labels replaced; the log of the final training loss),
   half of the tasks not told their horizon; weights selected on the validation group (final
   training loss at 500 steps, each task told and not). It resumes from
   ``runs/learned-adaptation-untold/ckpt``; on a fresh machine it first copies the committed
   checkpoint (``experiments/checkpoints/learned-adaptation-untold.pt``) there.
3. ``weights`` (not run by default): the committed checkpoint's best weights exported to
   ``runs/learned-adaptation-untold/weights.pt`` (the sealed test's input on a fresh clone).
4. ``sealed``, only if the best weights' validation metric is at least 1% below that of
   ``general-v7`` (the run's iteration 0; smaller differences are within what
   ``benchmarks/selection_noise.py`` measured as the selection's noise): the sealed test
   group at 100 and 1,000 steps, once (``SEALED_ARGS="--total-steps
   --optimizers learned,learned-zeroed" bash benchmarks/results/sealed/candidate.sh
   experiments/learned_adaptation_untold.py learned-adaptation-untold``; not told the horizon:
   ``learned-adaptation-untold-horizon-free-{100,1000}``).
5. ``ship`` (not run by default): the committed checkpoint's best weights as the shipped
   ``general-v8``, with their provenance and sealed figures beside ``general-v7``'s; refused
   if their sealed geometric mean is above ``general-v7``'s at either horizon, told or not.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402
import learned_adaptation  # noqa: E402

NAME = "learned-adaptation-untold"
#: The name of the shipped weights.
SHIPPED = "general-v8"
#: ``general-v7``'s sealed runs (told the horizon; and not).
BASE_SEALED, BASE_SEALED_FREE = "learned-adaptation", "learned-adaptation-horizon-free"
RUN = Path("runs") / NAME
#: The shipped weights whose learned adaptation keeps learning.
BASE = "general-v7"
#: The share of meta-training tasks not told their horizon.
UNTOLD_FRACTION = 0.5


#: ``experiments/learned_adaptation.py``'s meta-training command on this run's folders, half of
#: the tasks not told their horizon, the best weights selected told and not, 70 minutes.
META_TRAIN = [arg.replace(str(learned_adaptation.RUN), str(RUN))
              for arg in learned_adaptation.META_TRAIN]  # fmt: skip
META_TRAIN[META_TRAIN.index("--truncation") : META_TRAIN.index("--truncation")] = [
    "--untold-fraction", str(UNTOLD_FRACTION)
]  # fmt: skip
META_TRAIN.insert(META_TRAIN.index("--checkpoint-every"), "--eval-untold")
META_TRAIN[META_TRAIN.index("--time-budget") + 1] = "4200"


def write_init(path: Path) -> None:
    import learned_opt
    from learned_opt import load_rule, save_rule

    rule, _ = load_rule(learned_opt.pretrained.path(BASE))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_rule(path, rule, {"source": f"the shipped {BASE!r}"})


RECIPE = candidates.LearnedPartRecipe(
    name=NAME, script="experiments/learned_adaptation_untold.py",
    description=(__doc__ or "").splitlines()[0], shipped=SHIPPED, base=BASE,
    base_sealed=BASE_SEALED, base_sealed_free=BASE_SEALED_FREE,
    source=f"the shipped {BASE!r} with its learned step-size adaptation meta-trained further, "
    "half of the tasks not told their horizon (its LSTM, read-out and schedule fixed)",
    settings={"untold_fraction": UNTOLD_FRACTION}, start=BASE,
    labels=("learned adaptation, told and not told in meta-training",
            f"{BASE!r} meta-trained further, half of the tasks not told",
            "learned outputs zeroed (no adaptation)"),
    write_init=write_init, meta_train=META_TRAIN, metric=candidates.HELD_OUT_TOLD_AND_UNTOLD,
)  # fmt: skip
ship, main = RECIPE.ship, RECIPE.main
CHECKPOINT, VALIDATION = RECIPE.checkpoint, RECIPE.validation


if __name__ == "__main__":
    raise SystemExit(main())
