"""Recipe of a default candidate: ``experiments/learned_late_decay.py`` with its evolution
strategies smoothed five times as wide (perturbations of standard deviation 0.5 instead of 0.1).

    python experiments/learned_late_decay_smoothed.py --steps init,meta-train --procs 2  # resumes
    python experiments/learned_late_decay_smoothed.py --steps validate   # best vs zeroed
    python experiments/learned_late_decay_smoothed.py --dry-run          # print its commands

Run it from the repository root. The four log-schedule weights of the late-decay recipe, from
zero, with the same meta-training except the perturbations' scale. The final loss of a
meta-training task moves, for a change of an early-acting weight as small as 0.05, by several
percent and not monotonically, as a new seed would move it (the weights act through the whole
trajectory; ``benchmarks/selection_noise.py`` measures the same for the learning rate); a
perturbation of 0.1 then changes the loss by less than that noise, and the late-decay run's
weights wandered (docs/results.md). Perturbations of 0.5 change the schedule by factors of
order ``e^0.5`` early in a run, beyond it. Into ``runs/learned-late-decay-smoothed`` and
``experiments/checkpoints/learned-late-decay-smoothed.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402
import learned_basis_schedule as basis_schedule  # noqa: E402
import learned_late_decay as late_decay  # noqa: E402

NAME = "learned-late-decay-smoothed"
SHIPPED, BASE = basis_schedule.SHIPPED, basis_schedule.BASE
BASE_SEALED, BASE_SEALED_FREE = basis_schedule.BASE_SEALED, basis_schedule.BASE_SEALED_FREE
RUN = Path("runs") / NAME
CHECKPOINT = Path("experiments/checkpoints") / f"{NAME}.pt"
VALIDATION = Path("benchmarks/results/validation") / NAME
TAILS, LEARNED = late_decay.TAILS, late_decay.LEARNED
#: The standard deviation of the evolution strategies' perturbations of the four weights.
SIGMA = 0.5
META_TRAIN = basis_schedule.meta_train_command(RUN, sigma=SIGMA)
initial_rule, write_init = late_decay.initial_rule, late_decay.write_init


def ship(dest: Path, sealed_dir: Path = candidates.SEALED, checkpoint: Path = CHECKPOINT) -> dict:
    """Write the best weights of the committed ``checkpoint`` as ``dest/{SHIPPED}.pt`` with
    their provenance and figures (refused, writing nothing, if their sealed geometric mean is
    above ``general-v7``'s at some horizon, told or not)."""
    return basis_schedule.ship_schedule(
        dest, sealed_dir, checkpoint, name=NAME, settings=LEARNED,
        recipe="experiments/learned_late_decay_smoothed.py", count="four",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return basis_schedule.schedule_main(
        argv, (__doc__ or "").splitlines()[0], ship=ship, name=NAME, run=RUN,
        checkpoint=CHECKPOINT, validation=VALIDATION, label="learned late decay, smoothed",
        count="four", write_init=write_init, meta_train=META_TRAIN,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
