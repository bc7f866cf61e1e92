"""Recipe of a default candidate: ``general-v7`` with its warm-up and decay learned from nothing
instead of hand-designed.

    python experiments/learned_warmup_decay.py --steps init,meta-train --procs 2   # (resumes)
    python experiments/learned_warmup_decay.py --steps validate   # best weights vs zeroed
    python experiments/learned_warmup_decay.py --steps weights    # the committed run's best
    python experiments/learned_warmup_decay.py --dry-run          # print its commands

Run it from the repository root. Why this part: ``general-v7`` learned its per-tensor step-size
adaptation from nothing, but told the run's length it still multiplies its step by a
hand-designed schedule (a linear warm-up over the first 2% of the steps, a linear decay over the
last 20%), and not told, by nothing. Here that schedule is replaced by the learned one of
:class:`~learned_opt.rules.ScheduledRule`: ``exp(s_t)``, ``s_t`` a small MLP (16 tanh units) of
features of the step ``t`` and, when the length ``T`` is given, of the progress ``t / T``.
Only its output layer is meta-trained (17 weights, on 16 fixed random tanh features of
``[known, p, p^2, cos(pi p), exp(-t/10), exp(-t/100), log t]``): at zero at the start, no
schedule at all, told or not; few weights, so that persistent ES's estimate of their
meta-gradient is not drowned in noise (docs/results.md, "Its warm-up and decay learned too").
Meta-trained on runs told their length and runs not told it, the same
weights learn a warm-up and decay for ``total_steps=T`` and a horizon-free one. Everything else
stays at ``general-v7``'s, fixed (its learned adaptation included).

The steps:

1. ``init``: writes ``runs/learned-warmup-decay/init.pt``: ``general-v7`` without its
   hand-designed schedule, with a learned one at zero.
2. ``meta-train``: persistent evolution strategies over whole unrolls of 100-1,000 steps (the
   horizon drawn log-uniformly per task; half the tasks told it, half not; one window per task;
   8 antithetic pairs, sigma 0.1), meta-lr 0.1, on ``meta-train-rescaled`` with a fifth of
   each classifier's training labels replaced (as ``general-v7``'s); meta-loss: the log of the
   final training loss; each task's estimate clipped before the mean; weights selected on the
   ``validation`` group (final training loss at 500 steps, told). It resumes from
   ``runs/learned-warmup-decay/ckpt``; on a fresh machine it first copies the committed
   checkpoint (``experiments/checkpoints/learned-warmup-decay.pt``) there.
3. ``validate`` (not run by default): the run's best weights against the same rule with its
   learned outputs zeroed (no schedule, no adaptation), with
   ``benchmarks/sealed.py --group validation --total-steps`` at 100 and 1,000 steps
   (``benchmarks/results/validation/learned-warmup-decay/``).
4. ``weights`` (not run by default): the committed checkpoint's best weights exported to
   ``runs/learned-warmup-decay/weights.pt``.
5. ``sealed``: the sealed test group at 100 and 1,000 steps, once (``SEALED_ARGS=--total-steps
   bash benchmarks/results/sealed/candidate.sh experiments/learned_warmup_decay.py
   learned-warmup-decay``; not told the horizon: ``learned-warmup-decay-horizon-free-{100,1000}``).
6. ``ship`` (not run by default): the committed checkpoint's best weights as the shipped
   ``general-v8``, with their provenance and sealed figures beside ``general-v7``'s; refused if
   their sealed geometric mean is above ``general-v7``'s at either horizon, told or not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402

NAME = "learned-warmup-decay"
#: The name of the shipped weights.
SHIPPED = "general-v8"
#: The shipped weights whose hand-designed schedule the learned one replaces.
BASE = "general-v7"
#: ``general-v7``'s sealed runs (told the horizon; and not).
BASE_SEALED, BASE_SEALED_FREE = "learned-adaptation", "learned-adaptation-horizon-free"
RUN = Path("runs") / NAME
CHECKPOINT = Path("experiments/checkpoints") / f"{NAME}.pt"
VALIDATION = Path("benchmarks/results/validation") / NAME
#: What the run changes in the base rule's schedule: no hand-designed part, a learned one (of
#: the step alone when the length is not told).
LEARNED = {"warmup": 0.0, "tail": 0.0, "unknown_horizon": "learned", "learn_schedule": True}
#: The meta-training group: ``meta-train-rescaled`` with label noise.
FAMILY_KWARGS = {"label_noise": 0.2}

META_TRAIN = [
    "meta-train", "--family", "meta-train-rescaled",
    "--family-kwargs", json.dumps(FAMILY_KWARGS), "--rule", "scheduled",
    "--init-weights", str(RUN / "init.pt"),
    "--train-only", "schedule.2.",
    "--horizon", "1000", "--min-horizon", "100", "--untold-fraction", "0.5",
    "--truncation", "1000", "--objective", "final-train", "--log-meta-loss",
    "--estimator", "pes", "--estimator-kwargs", json.dumps({"sigma": 0.1, "pairs": 8}),
    "--clip-grad-per-task", "--meta-lr", "0.1", "--meta-batch", "4", "--clip-grad", "1",
    "--iterations", "100000", "--time-budget", "40000", "--eval-every", "5",
    "--eval-tasks", "8", "--eval-family", "validation", "--eval-horizon", "500",
    "--checkpoint-every", "1", "--log-dir", str(RUN / "tb"), "--ckpt-dir", str(RUN / "ckpt"),
    "--export", str(RUN / "weights.pt"), "--resume",
]  # fmt: skip


def initial_rule():
    """``general-v7`` with the learned schedule at zero in place of the hand-designed one (the
    meta-training trains only its output layer, ``--train-only``)."""
    import learned_opt
    from learned_opt import load_rule
    from learned_opt.rules import build_rule

    base, _ = load_rule(learned_opt.pretrained.path(BASE))
    rule = build_rule(base.kind, {**base.config(), **LEARNED})
    rule.load_state_dict(base.state_dict())
    last = rule.schedule[2]  # (the shipped schedule's learned layer is at zero: no schedule)
    assert not last.weight.any() and not last.bias.any(), "the base's learned schedule is not zero"
    return rule


def write_init(path: Path) -> None:
    from learned_opt import save_rule

    path.parent.mkdir(parents=True, exist_ok=True)
    source = f"the shipped {BASE!r}, its hand-designed schedule replaced by a learned one at zero"
    save_rule(path, initial_rule(), {"source": source})


def ship(dest: Path, sealed_dir: Path = candidates.SEALED, checkpoint: Path = CHECKPOINT) -> dict:
    """Write the best weights of the committed ``checkpoint`` (those sealed-tested) as
    ``dest/{SHIPPED}.pt`` (and ``.json``) with their provenance and figures; returns the
    metadata (:func:`candidates.ship_learned_part`).

    Raises:
        ValueError: their sealed geometric mean (told the horizon, or not) is above
            ``general-v7``'s at some horizon; nothing is written then.
    """
    return candidates.ship_learned_part(
        dest, name=NAME, shipped=SHIPPED, base=BASE, base_sealed=BASE_SEALED,
        base_sealed_free=BASE_SEALED_FREE, checkpoint=checkpoint, sealed_dir=sealed_dir,
        source=f"the shipped {BASE!r} with its warm-up and decay learned from nothing, told the "
        "run's length and not (the schedule's output layer; everything else fixed)",
        recipe="experiments/learned_warmup_decay.py", settings=LEARNED, start="no_schedule",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return candidates.learned_part_main(
        argv, (__doc__ or "").splitlines()[0], ship=ship, shipped=SHIPPED, run=RUN,
        checkpoint=CHECKPOINT, validation=VALIDATION,
        validation_labels=("learned warm-up and decay",
                           f"{BASE!r} with its warm-up and decay learned",
                           "learned outputs zeroed (no schedule, no adaptation)"),
        write_init=write_init, meta_train=META_TRAIN, name=NAME,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
