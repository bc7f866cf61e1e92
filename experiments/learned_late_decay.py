"""Recipe of a default candidate: ``general-v7`` with its warm-up and decay learned from nothing,
as the weights of four log-schedules, one of them a late decay.

    python experiments/learned_late_decay.py --steps init,meta-train --procs 2   # (resumes)
    python experiments/learned_late_decay.py --steps validate   # best weights vs zeroed
    python experiments/learned_late_decay.py --dry-run          # print its commands

Run it from the repository root. ``experiments/learned_basis_schedule.py`` with one more
log-schedule on the linear path (``ScheduledRule(basis_tails=(0.2,))``): a decay over the last
20% of a told run only, ``min(1, (T - t + 1) / (0.2 T))`` to the power ``w_4`` (``w_4 = 1``: the
hand-designed decay of ``general-v7``, bounded at ``e^-3``). The three log-schedules of that
recipe decay from the start of a run; on the validation group and on the meta-training group
alike, ``general-v7``'s late decay scored better than every setting of those three, while with
this one the family reaches it (``experiments/basis_schedule_grid.py --tails '[0.2]'``;
docs/results.md, "The same schedule as the weights of three log-schedules"). All four weights
start at zero (no schedule, told or not; zeroing them is the ablation); the meta-training is
that recipe's (PES over whole 100-1,000-step unrolls, half told their length, 8 tasks of 4
pairs, meta-lr 0.1, the meta-loss floored at 5% of each task's first loss), into
``runs/learned-late-decay`` and ``experiments/checkpoints/learned-late-decay.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402
import learned_basis_schedule as basis_schedule  # noqa: E402

NAME = "learned-late-decay"
SHIPPED, BASE = basis_schedule.SHIPPED, basis_schedule.BASE
BASE_SEALED, BASE_SEALED_FREE = basis_schedule.BASE_SEALED, basis_schedule.BASE_SEALED_FREE
RUN = Path("runs") / NAME
CHECKPOINT = Path("experiments/checkpoints") / f"{NAME}.pt"
VALIDATION = Path("benchmarks/results/validation") / NAME
#: The fraction of a told run that the late decay spans.
TAILS = (0.2,)
LEARNED = {**basis_schedule.LEARNED, "basis_tails": list(TAILS)}
META_TRAIN = basis_schedule.meta_train_command(RUN)


def initial_rule():
    """``general-v7`` with no hand-designed schedule and the four-weight linear path at zero."""
    return basis_schedule.initial_rule(TAILS)


def write_init(path: Path) -> None:
    basis_schedule.write_init(path, TAILS)


def ship(dest: Path, sealed_dir: Path = candidates.SEALED, checkpoint: Path = CHECKPOINT) -> dict:
    """Write the best weights of the committed ``checkpoint`` as ``dest/{SHIPPED}.pt`` with
    their provenance and figures (refused, writing nothing, if their sealed geometric mean is
    above ``general-v7``'s at some horizon, told or not)."""
    return basis_schedule.ship_schedule(
        dest, sealed_dir, checkpoint, name=NAME, settings=LEARNED,
        recipe="experiments/learned_late_decay.py", count="four",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return basis_schedule.schedule_main(
        argv, (__doc__ or "").splitlines()[0], ship=ship, name=NAME, run=RUN,
        checkpoint=CHECKPOINT, validation=VALIDATION, label="learned late decay",
        count="four", write_init=write_init, meta_train=META_TRAIN,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
