"""Recipe of a learned gain on the retuned step-size adaptation (a default candidate).

    python experiments/adaptation_rate_gain.py               # init, meta-train (resumes), sealed
    python experiments/adaptation_rate_gain.py --dry-run     # print its commands, run nothing
    python experiments/adaptation_rate_gain.py --steps meta-train --procs 2

Run it from the repository root. The rule is the retuned-adaptation candidate
(``experiments/adaptation_rate.py``: the shipped weights with the adaptation's settings chosen on
the validation group) with the learned-gain controller of ``experiments/adaptation_gain.py``
(``controller_hidden=8``, zero last layer: the candidate step for step at the start), meta-trained
by that recipe's persistent evolution strategies over whole unrolls. The learned gain was worth
2.8% at 1,000 steps on the shipped settings, whose adaptation the retuning slowed; this run
measures what a learned gain adds on top of the better hand-designed part.

The steps: ``init`` writes ``runs/adaptation-rate-gain/init.pt``; ``meta-train`` is the gain
recipe's command in ``runs/adaptation-rate-gain`` (resuming; on a fresh machine from the
committed checkpoint ``experiments/checkpoints/adaptation-rate-gain.pt``); ``sealed`` is the
sealed test, once.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adaptation_gain  # noqa: E402
import adaptation_rate  # noqa: E402
import candidates  # noqa: E402

RUN = Path("runs/adaptation-rate-gain")
CHECKPOINT = Path("experiments/checkpoints/adaptation-rate-gain.pt")

META_TRAIN = [arg.replace(str(adaptation_gain.RUN), str(RUN)) for arg in adaptation_gain.META_TRAIN]


def write_init(path: Path) -> None:
    """The retuned candidate with the gain recipe's zero controller."""
    import learned_opt
    from learned_opt import load_rule, save_rule

    base, _ = load_rule(learned_opt.pretrained.path("general"))
    rule = base.variant(**adaptation_rate.CHOSEN, **adaptation_gain.CONTROLLER)
    path.parent.mkdir(parents=True, exist_ok=True)
    source = "the retuned-adaptation candidate with a zero adaptation gain"
    save_rule(path, rule, {"source": source})


def main(argv: list[str] | None = None) -> int:
    return candidates.main(
        __doc__.splitlines()[0], argv, run=RUN, checkpoint=CHECKPOINT, write_init=write_init,
        meta_train=META_TRAIN, sealed=candidates.sealed_command(RUN, "adaptation-rate-gain"),
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
