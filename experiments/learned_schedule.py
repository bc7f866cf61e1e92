"""Recipe of a learned step-size schedule on the default rule, told the run's length (a candidate).

    python experiments/learned_schedule.py               # init, meta-train (resumes), sealed test
    python experiments/learned_schedule.py --dry-run     # print its commands, run nothing
    python experiments/learned_schedule.py --steps meta-train --procs 2

Run it from the repository root. The rule is a :class:`~learned_opt.rules.ScheduledRule` around
the shipped default, ``general-v4`` (its LSTM, read-out and hand-designed adaptation fixed at the
shipped weights, ``learn_lstm=False``): a small MLP of the step ``t`` and the progress ``t / T``
multiplies every update by ``exp(s_t)``, ``|s_t| <= 3``. Only the schedule's 145 weights are
meta-trained. Its last layer starts at zero, so the run starts from ``general-v4``, step for step.

Why this part: on the sealed test group tuned Adam with warm-up and cosine decay beats tuned
constant-rate Adam by 7.6% at 1,000 steps, and ``general-v4`` under the same schedule by 2.8%,
but the same warm-up costs both at 100 steps: the schedule that pays depends on the horizon, which
the rule can read when ``LSTMOptimizer(params, total_steps=N)`` gives it; a one-number-per-step
function of few weights is what evolution strategies over whole runs estimate well (the learned
gain on the adaptation, 65 weights, was the first learned part to help outside meta-training).

The steps:

1. ``init``: writes ``runs/learned-schedule/init.pt``: ``general-v4`` under the identity
   schedule (identical steps to ``general-v4``).
2. ``meta-train``: persistent evolution strategies over whole unrolls of 100-1,000 steps (horizon
   drawn log-uniformly per task and told to the rule; one window per task: unbiased for the
   smoothed objective of the whole run; 8 antithetic pairs, sigma 0.1) on the
   ``meta-train-rescaled`` group; meta-loss: the log of the final training loss; each task's
   estimate clipped before the mean; weights selected on the ``validation`` group (final
   training loss at 500 steps, the horizon told). It resumes from ``runs/learned-schedule/ckpt``;
   on a fresh machine it first copies the committed checkpoint
   (``experiments/checkpoints/learned-schedule.pt``) there. ``--procs N`` runs it under
   ``torchrun`` with N processes of one thread.
3. ``sealed``: the sealed test group (``benchmarks/sealed.py --total-steps``) at 100 and 1,000
   steps, once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402

RUN = Path("runs/learned-schedule")
CHECKPOINT = Path("experiments/checkpoints/learned-schedule.pt")

#: The shipped weights the schedule is learned around.
BASE = "general-v4"
#: The schedule MLP: hidden units and the bound on ``|s_t|``.
SCHEDULE = {"hidden": 16, "bound": 3.0}

META_TRAIN = [
    "meta-train", "--family", "meta-train-rescaled", "--rule", "scheduled",
    "--init-weights", str(RUN / "init.pt"),
    "--horizon", "1000", "--min-horizon", "100", "--truncation", "1000",
    "--objective", "final-train", "--log-meta-loss",
    "--estimator", "pes", "--estimator-kwargs", json.dumps({"sigma": 0.1, "pairs": 8}),
    "--clip-grad-per-task", "--meta-lr", "1e-2", "--meta-batch", "4", "--clip-grad", "1",
    "--iterations", "100000", "--time-budget", "20000", "--eval-every", "10",
    "--eval-tasks", "8", "--eval-family", "validation", "--eval-horizon", "500",
    "--checkpoint-every", "2", "--log-dir", str(RUN / "tb"), "--ckpt-dir", str(RUN / "ckpt"),
    "--export", str(RUN / "weights.pt"), "--resume",
]  # fmt: skip


def initial_rule():
    """``general-v4`` (fixed) under the identity schedule."""
    import learned_opt
    from learned_opt import load_rule
    from learned_opt.rules import ScheduledRule

    base, _ = load_rule(learned_opt.pretrained.path(BASE))
    base = base.variant(learn_lstm=False)
    rule = ScheduledRule(base="general-lstm", base_config=base.config(), **SCHEDULE)
    rule.base.load_state_dict(base.state_dict())
    return rule


def write_init(path: Path) -> None:
    from learned_opt import save_rule

    path.parent.mkdir(parents=True, exist_ok=True)
    save_rule(path, initial_rule(), {"source": f"the shipped {BASE!r} under the identity schedule"})


def sealed(steps: int) -> list[str]:
    return [*candidates.sealed_command(RUN, "learned-schedule")(steps), "--total-steps"]


def main(argv: list[str] | None = None) -> int:
    return candidates.main(
        __doc__.splitlines()[0], argv, run=RUN, checkpoint=CHECKPOINT, write_init=write_init,
        meta_train=META_TRAIN, sealed=sealed,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
