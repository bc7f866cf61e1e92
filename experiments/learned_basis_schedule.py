"""Recipe of a default candidate: ``general-v7`` with its warm-up and decay learned from nothing,
as the weights of three log-schedules instead of the output layer of a small MLP.

    python experiments/learned_basis_schedule.py --steps init,meta-train --procs 2   # (resumes)
    python experiments/learned_basis_schedule.py --steps validate   # best weights vs zeroed
    python experiments/learned_basis_schedule.py --steps weights    # the committed run's best
    python experiments/learned_basis_schedule.py --dry-run          # print its commands

Run it from the repository root. The same candidate as ``experiments/learned_warmup_decay.py``
(``general-v7`` without its hand-designed warm-up and decay, a learned schedule in their place,
told the run's length or not), with the schedule's learned part changed: there, the 17 output
weights of an MLP on fixed random tanh features, which must grow to 1-3 to fit a decay like
the hand-designed one and moved slowly under persistent ES's noisy estimates; here, the three
weights ``w`` of ``ScheduledRule(basis=True)``'s linear path (``exp(w . b)``,
:func:`~learned_opt.rules.scheduled.schedule_basis`): ``(T - t + 1) / T`` to the power ``w_1``
when the length ``T`` is told (``w_1 = 1``: a linear decay to zero), ``1 - exp(-t / 10)`` to
the power ``w_2`` (a warm-up), and ``(1 + t / 100)^-w_3`` when it is not told (a horizon-free
decay). All three start at zero: no schedule at all, told or not, so zeroing them (the
ablation) leaves none. Everything else is as in ``experiments/learned_warmup_decay.py`` (the
meta-training tasks, PES over whole 100-1,000-step unrolls half told their length, the
validation), with 8 tasks of 4 antithetic pairs per meta-iteration instead of 4 of 8 (with three
weights, the differences between tasks, not between particles, dominate the estimate's noise),
and the meta-loss floored, ``log(L + 0.05 L_1)`` (``--meta-loss-floor``; ``L_1`` the task's
first training loss), so that tasks that end near zero loss do not steer it. The run did not
make the validation group better (docs/results.md, "The same schedule as the weights of three
log-schedules"): the meta-training group pulls the weights to a larger first step (a warm-up in
reverse), with the floor or without.

Its steps (``init``, ``meta-train``, ``validate``, ``weights``, ``sealed``, ``ship``) are those of
``experiments/learned_warmup_decay.py``, with ``runs/learned-basis-schedule``,
``experiments/checkpoints/learned-basis-schedule.pt`` and
``benchmarks/results/validation/learned-basis-schedule/``; ``ship`` writes ``general-v8`` and
refuses weights whose sealed geometric mean is above ``general-v7``'s at either horizon, told or
not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402
import learned_warmup_decay as mlp_schedule  # noqa: E402

NAME = "learned-basis-schedule"
SHIPPED, BASE = mlp_schedule.SHIPPED, mlp_schedule.BASE
BASE_SEALED, BASE_SEALED_FREE = mlp_schedule.BASE_SEALED, mlp_schedule.BASE_SEALED_FREE
RUN = Path("runs") / NAME
CHECKPOINT = Path("experiments/checkpoints") / f"{NAME}.pt"
VALIDATION = Path("benchmarks/results/validation") / NAME
#: What the run changes in the base rule's schedule: no hand-designed part; a learned linear
#: path on three log-schedules (the MLP's output stays at zero).
LEARNED = {**mlp_schedule.LEARNED, "basis": True}


#: The meta-loss is ``log(L + F L_1)`` (``--meta-loss-floor``), so that the tasks that reach
#: near-zero loss do not steer these three weights.
META_LOSS_FLOOR = 0.05


def meta_train_command(run: Path, sigma: float = 0.1) -> list[str]:
    """``experiments/learned_warmup_decay.py``'s meta-training, on the linear path's weights,
    from ``run/init.pt`` (files in ``run``), with 8 tasks of 4 pairs (perturbations of standard
    deviation ``sigma``) per meta-iteration and the meta-loss floored."""
    out = list(mlp_schedule.META_TRAIN)
    replace = {
        "--init-weights": str(run / "init.pt"), "--train-only": "basis.",
        "--estimator-kwargs": json.dumps({"sigma": sigma, "pairs": 4}), "--meta-batch": "8",
        "--log-dir": str(run / "tb"), "--ckpt-dir": str(run / "ckpt"),
        "--export": str(run / "weights.pt"),
    }  # fmt: skip
    for option, value in replace.items():
        out[out.index(option) + 1] = value
    out[out.index("--log-meta-loss") + 1 : out.index("--log-meta-loss") + 1] = [
        "--meta-loss-floor", str(META_LOSS_FLOOR)
    ]  # fmt: skip
    return out


META_TRAIN = meta_train_command(RUN)


def initial_rule(tails: tuple[float, ...] = (), **settings):
    """``general-v7`` with no hand-designed schedule and the learned linear path at zero (with
    late-decay log-schedules over the last ``c T`` steps for each ``c`` of ``tails``; other
    ``settings`` of the schedule, e.g. its ``bound``)."""
    import learned_opt
    from learned_opt import load_rule
    from learned_opt.rules import build_rule

    base, _ = load_rule(learned_opt.pretrained.path(BASE))
    config = {**base.config(), **LEARNED, "basis_tails": list(tails), **settings}
    rule = build_rule(base.kind, config)
    missing, unexpected = rule.load_state_dict(base.state_dict(), strict=False)
    assert missing == ["basis.weight"] and not unexpected, (missing, unexpected)
    assert not rule.basis.weight.any() and not rule.schedule[2].weight.any()
    return rule


def write_init(path: Path, tails: tuple[float, ...] = ()) -> None:
    from learned_opt import save_rule

    path.parent.mkdir(parents=True, exist_ok=True)
    source = (
        f"the shipped {BASE!r}, its hand-designed schedule replaced by a learned linear path on "
        f"{3 + len(tails)} log-schedules, at zero"
    )
    save_rule(path, initial_rule(tails), {"source": source})


def ship_schedule(
    dest: Path, sealed_dir: Path, checkpoint: Path, *, name: str, settings: dict, recipe: str,
    count: str,
) -> dict:  # fmt: skip
    """The ship step of a candidate that learns ``general-v7``'s schedule as the weights of
    ``count`` log-schedules (this recipe's and ``experiments/learned_late_decay.py``'s):
    :func:`candidates.ship_learned_part`."""
    return candidates.ship_learned_part(
        dest, name=name, shipped=SHIPPED, base=BASE, base_sealed=BASE_SEALED,
        base_sealed_free=BASE_SEALED_FREE, checkpoint=checkpoint, sealed_dir=sealed_dir,
        source=f"the shipped {BASE!r} with its warm-up and decay learned from nothing, told the "
        f"run's length and not (the weights of {count} log-schedules; everything else fixed)",
        recipe=recipe, settings=settings, start="no_schedule",
    )  # fmt: skip


def schedule_main(
    argv: list[str] | None, description: str, *, ship: Any, name: str, run: Path,
    checkpoint: Path, validation: Path, label: str, count: str, write_init: Any,
    meta_train: list[str],
) -> int:  # fmt: skip
    """The command line of such a candidate (:func:`candidates.learned_part_main`)."""
    return candidates.learned_part_main(
        argv, description, ship=ship, shipped=SHIPPED, run=run, checkpoint=checkpoint,
        validation=validation,
        validation_labels=(label,
                           f"{BASE!r} with its warm-up and decay learned ({count} log-schedules)",
                           "learned outputs zeroed (no schedule, no adaptation)"),
        write_init=write_init, meta_train=meta_train, name=name,
    )  # fmt: skip


def ship(dest: Path, sealed_dir: Path = candidates.SEALED, checkpoint: Path = CHECKPOINT) -> dict:
    """Write the best weights of the committed ``checkpoint`` (those sealed-tested) as
    ``dest/{SHIPPED}.pt`` (and ``.json``) with their provenance and figures; returns the
    metadata.

    Raises:
        ValueError: their sealed geometric mean (told the horizon, or not) is above
            ``general-v7``'s at some horizon; nothing is written then.
    """
    return ship_schedule(
        dest, sealed_dir, checkpoint, name=NAME, settings=LEARNED,
        recipe="experiments/learned_basis_schedule.py", count="three",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return schedule_main(
        argv, (__doc__ or "").splitlines()[0], ship=ship, name=NAME, run=RUN,
        checkpoint=CHECKPOINT, validation=VALIDATION, label="learned basis schedule",
        count="three", write_init=write_init, meta_train=META_TRAIN,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
