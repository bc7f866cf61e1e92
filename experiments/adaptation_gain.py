"""Recipe of a learned gain on the default rule's step-size adaptation (a default candidate).

    python experiments/adaptation_gain.py               # init, meta-train (resumes), sealed test
    python experiments/adaptation_gain.py --dry-run     # print its commands, run nothing
    python experiments/adaptation_gain.py --steps meta-train --procs 2

Run it from the repository root. The rule is the shipped default (the LSTM-corrected Adam rule,
its LSTM and read-out fixed at the shipped weights) with a per-tensor controller
(``controller_hidden=8``): a small MLP of each tensor's scale-free statistics whose output
:math:`\\delta \\in [-2, 2]` multiplies the rate of the hand-designed step-size adaptation by
:math:`e^{\\delta}`. Only the controller's 65 weights are meta-trained. Its last layer starts at
zero, so the run starts from the shipped rule, step for step.

Why this part: on the validation tasks at 500 steps the adaptation costs 2.5% (the tasks' best
Adam learning rate is near the rule's base rate, where adapting only adds noise), while on tasks
whose scale is far from it the adaptation is what makes the rule tuning-free; when to adapt is
a per-tensor decision of a few statistics, which a low-dimensional learned part can make, and
whose meta-gradient evolution strategies estimate well (a few dozen weights, not 1,600).

The steps:

1. ``init``: writes ``runs/adaptation-gain/init.pt``: the shipped ``general`` weights with the
   zero controller (identical steps to ``general``).
2. ``meta-train``: persistent evolution strategies over whole unrolls of 100-1,000 steps (one
   window per task: unbiased for the smoothed objective of the whole run, which neither the
   chaos of long unrolls nor the adaptation's switches stop; 8 antithetic pairs, sigma 0.1) on
   the ``meta-train-rescaled`` group; meta-loss: the log of the final training loss; each task's
   estimate clipped before the mean; weights selected on the ``validation`` group (final
   training loss at 500 steps). It resumes from ``runs/adaptation-gain/ckpt``; on a fresh
   machine it first copies the committed checkpoint
   (``experiments/checkpoints/adaptation-gain.pt``) there. ``--procs N`` runs it under
   ``torchrun`` with N processes of one thread.
3. ``sealed``: the sealed test group (``benchmarks/sealed.py``) at 100 and 1,000 steps, once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402

RUN = Path("runs/adaptation-gain")
CHECKPOINT = Path("experiments/checkpoints/adaptation-gain.pt")

#: What the run changes in the shipped configuration.
CONTROLLER = {"controller_hidden": 8, "controller_bound": 2.0, "learn_lstm": False}

META_TRAIN = [
    "meta-train", "--family", "meta-train-rescaled", "--rule", "general-lstm",
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


def write_init(path: Path) -> None:
    """The shipped default with the zero controller."""
    import learned_opt
    from learned_opt import load_rule, save_rule

    base, _ = load_rule(learned_opt.pretrained.path("general"))
    rule = base.variant(**CONTROLLER)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_rule(path, rule, {"source": "the shipped 'general' with a zero adaptation gain"})


def main(argv: list[str] | None = None) -> int:
    return candidates.main(
        __doc__.splitlines()[0], argv, run=RUN, checkpoint=CHECKPOINT, write_init=write_init,
        meta_train=META_TRAIN, sealed=candidates.sealed_command(RUN, "adaptation-gain"),
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
