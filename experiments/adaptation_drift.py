"""Recipe of a learned drift on the default rule's step-size adaptation, beside the learned gain
(a default candidate).

    python experiments/adaptation_drift.py               # init, meta-train (resumes), sealed test
    python experiments/adaptation_drift.py --dry-run     # print its commands, run nothing
    python experiments/adaptation_drift.py --steps meta-train --procs 2

Run it from the repository root. The rule is the learned-gain candidate
(``experiments/adaptation_gain.py``) with a second controller output (``controller_drift=0.5``):
a per-tensor term :math:`d \\in [-0.5, 0.5]` added to the gained cosine, so that each change of
the log step size is :math:`\\kappa_t (c\\,e^{\\delta} + d)`. A gain cannot change the sign of the
cosine: the adaptation alone can neither decay a step while successive updates still agree nor
grow it through a noisy plateau, and a learning-rate schedule on top of it is undone by it (a
cosine decay of ``lr`` costs 1.9% on the validation tasks, ``benchmarks/ablations.py``). The drift
reads the same statistics (the step, the gradient norm against its peak, the cosines), so it
can learn a decay, and when to apply it, from the runs themselves.

The steps:

1. ``init``: writes ``runs/adaptation-drift/init.pt``: the best weights of the committed gain
   run (``experiments/checkpoints/adaptation-gain.pt``) with a zero drift, which steps exactly
   like that candidate.
2. ``meta-train``: the gain recipe's meta-training (PES over whole unrolls of 100-1,000 steps,
   8 antithetic pairs, sigma 0.1, log final training loss, ``meta-train-rescaled``, selection on
   ``validation`` at 500 steps), in ``runs/adaptation-drift``; on a fresh machine it first
   copies the committed checkpoint (``experiments/checkpoints/adaptation-drift.pt``) there.
3. ``sealed``: the sealed test group (``benchmarks/sealed.py``) at 100 and 1,000 steps, once.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adaptation_gain  # noqa: E402
import candidates  # noqa: E402

RUN = Path("runs/adaptation-drift")
CHECKPOINT = Path("experiments/checkpoints/adaptation-drift.pt")

#: What the run changes in the gain candidate's configuration.
DRIFT = {"controller_drift": 0.5}

META_TRAIN = [arg.replace(str(adaptation_gain.RUN), str(RUN)) for arg in adaptation_gain.META_TRAIN]


def write_init(path: Path) -> None:
    """The gain run's best weights with a zero drift."""
    from learned_opt import load_rule, save_rule

    gain, meta = load_rule(adaptation_gain.CHECKPOINT)  # a checkpoint gives its best rule
    path.parent.mkdir(parents=True, exist_ok=True)
    source = (
        f"the best weights (meta-iteration {meta['best_iteration']}) of "
        f"{adaptation_gain.CHECKPOINT} with a zero drift"
    )
    save_rule(path, gain.variant(**DRIFT), {"source": source})


def main(argv: list[str] | None = None) -> int:
    return candidates.main(
        __doc__.splitlines()[0], argv, run=RUN, checkpoint=CHECKPOINT, write_init=write_init,
        meta_train=META_TRAIN, sealed=candidates.sealed_command(RUN, "adaptation-drift"),
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
