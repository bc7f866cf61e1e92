"""Recipe of a default candidate: ``general-v6`` with its step-size adaptation learned from
nothing instead of hand-designed.

    python experiments/learned_adaptation.py --steps init,meta-train --procs 2   # (resumes)
    python experiments/learned_adaptation.py --steps validate   # best weights vs zeroed
    python experiments/learned_adaptation.py --steps weights    # the committed run's best
    python experiments/learned_adaptation.py --dry-run          # print its commands

Run it from the repository root. Why this part: every learned correction tried around
``general-v6`` (its LSTM read-out, a gain or a drift on its adaptation, a schedule, a mix of
directions) changes its validation figures by at most 1.5%, because what carries the rule is
the hand-designed per-tensor step-size adaptation (switched off: 6.3% / 5.4% worse on the
validation group at 100 / 500 steps, 8.7% on ``meta-train-noisy``). So here the learned part
*replaces* that adaptation instead of correcting it
(``LSTMCorrectedAdamConfig.lr_adapt_learned``): each change of a tensor's log step size is
:math:`\\kappa_t d`, with :math:`d \\in [-2, 2]` the output of a small MLP plus a linear path
of the tensor's six scale-free statistics (the cosine between the new gradient and the last
update, its running mean, the gradient norm against its peak, the log step size and two
features of the step count): 71 weights, at zero at the start, where the rule does not adapt
at all (``general-v6`` with its adaptation off). The LSTM, its read-out and the schedule stay
at ``general-v6``'s, fixed.

The steps:

1. ``init``: writes ``runs/learned-adaptation/init.pt``: ``general-v6`` (told the horizon by
   its fixed schedule) with the zero learned adaptation.
2. ``meta-train``: persistent evolution strategies over whole unrolls of 100-1,000 steps (the
   horizon drawn log-uniformly per task and told; one window per task: unbiased for the
   smoothed objective of the whole run; 8 antithetic pairs, sigma 0.1), meta-lr 3e-2, on the
   ``meta-train`` group with random per-task parameter and loss scales (tasks whose best step
   size is far from the base one: what an adaptation is for) and a fifth of each classifier's
   training labels replaced (a noise floor: the meta-objective does not reward polishing
   near-zero losses); meta-loss: the log of the final training loss; each task's estimate
   clipped before the mean; weights selected on the ``validation`` group (final training loss
   at 500 steps, the horizon told). It resumes from ``runs/learned-adaptation/ckpt``; on a
   fresh machine it first copies the committed checkpoint
   (``experiments/checkpoints/learned-adaptation.pt``) there.
3. ``validate`` (not run by default): the run's best weights against the same rule with its
   learned outputs zeroed (no adaptation), with
   ``benchmarks/sealed.py --group validation --total-steps`` at 100 and 1,000 steps
   (``benchmarks/results/validation/learned-adaptation/``).
4. ``weights`` (not run by default): the committed checkpoint's best weights exported to
   ``runs/learned-adaptation/weights.pt`` (the sealed test's input on a fresh clone).
5. ``sealed``: the sealed test group at 100 and 1,000 steps, once (``SEALED_ARGS=--total-steps
   bash benchmarks/results/sealed/candidate.sh experiments/learned_adaptation.py
   learned-adaptation``; not told the horizon: ``learned-adaptation-horizon-free-{100,1000}``).
6. ``ship`` (not run by default): the committed checkpoint's best weights as the shipped
   ``general-v7``, with their provenance and sealed figures beside ``general-v6``'s; refused
   if their sealed geometric mean is above ``general-v6``'s at either horizon.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402

NAME = "learned-adaptation"
#: The name of the shipped weights.
SHIPPED = "general-v7"
#: ``general-v6``'s sealed runs (told the horizon; and not).
BASE_SEALED, BASE_SEALED_FREE = "orthogonal-direction", "general-v6-horizon-free"
RUN = Path("runs") / NAME
#: The shipped weights whose hand-designed adaptation the learned one replaces.
BASE = "general-v6"
#: What the run changes in the base rule's configuration.
LEARNED = {
    "controller_hidden": 8, "controller_drift": 2.0, "lr_adapt_learned": True,
    "learn_lstm": False,
}  # fmt: skip
#: The meta-training group: ``meta-train-rescaled`` with label noise.
FAMILY_KWARGS = {"label_noise": 0.2}

META_TRAIN = [
    "meta-train", "--family", "meta-train-rescaled",
    "--family-kwargs", json.dumps(FAMILY_KWARGS), "--rule", "scheduled",
    "--init-weights", str(RUN / "init.pt"),
    "--horizon", "1000", "--min-horizon", "100", "--truncation", "1000",
    "--objective", "final-train", "--log-meta-loss",
    "--estimator", "pes", "--estimator-kwargs", json.dumps({"sigma": 0.1, "pairs": 8}),
    "--clip-grad-per-task", "--meta-lr", "3e-2", "--meta-batch", "4", "--clip-grad", "1",
    "--iterations", "100000", "--time-budget", "40000", "--eval-every", "5",
    "--eval-tasks", "8", "--eval-family", "validation", "--eval-horizon", "500",
    "--checkpoint-every", "1", "--log-dir", str(RUN / "tb"), "--ckpt-dir", str(RUN / "ckpt"),
    "--export", str(RUN / "weights.pt"), "--resume",
]  # fmt: skip


def initial_rule():
    """``general-v6`` (LSTM, read-out and schedule fixed) with the zero learned adaptation."""
    import learned_opt
    from learned_opt import load_rule
    from learned_opt.rules import build_rule

    base, _ = load_rule(learned_opt.pretrained.path(BASE))
    config = base.config()
    config["base_config"] = {**config["base_config"], **LEARNED}
    config["learn_schedule"] = False
    rule = build_rule(base.kind, config)
    missing = rule.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert all(k.startswith("base.controller_") for k in missing), missing
    return rule


def write_init(path: Path) -> None:
    from learned_opt import save_rule

    path.parent.mkdir(parents=True, exist_ok=True)
    source = f"the shipped {BASE!r} with a learned step-size adaptation at zero (none)"
    save_rule(path, initial_rule(), {"source": source})


RECIPE = candidates.LearnedPartRecipe(
    name=NAME, script="experiments/learned_adaptation.py",
    description=(__doc__ or "").splitlines()[0], shipped=SHIPPED, base=BASE,
    base_sealed=BASE_SEALED, base_sealed_free=BASE_SEALED_FREE,
    source=f"the shipped {BASE!r} with its step-size adaptation learned from nothing (its "
    "LSTM, read-out and schedule fixed)",
    settings=LEARNED, start="no_adaptation",
    labels=("learned adaptation", f"{BASE!r} with its step-size adaptation learned",
            "learned outputs zeroed (no adaptation)"),
    write_init=write_init, meta_train=META_TRAIN,
)  # fmt: skip
ship, main = RECIPE.ship, RECIPE.main
CHECKPOINT, VALIDATION = RECIPE.checkpoint, RECIPE.validation


if __name__ == "__main__":
    raise SystemExit(main())
