"""Recipe of a default candidate: ``general-v2``'s learned parts and a learned adaptation gain,
meta-trained by PES over short truncation windows (many more meta-steps per hour).

    python experiments/truncated_pes.py                     # init, meta-train (resumes), sealed
    python experiments/truncated_pes.py --dry-run           # print its commands, run nothing
    python experiments/truncated_pes.py --steps meta-train --procs 2

Run it from the repository root. The earlier PES recipes (``lstm_pes.py``,
``adaptation_rate_gain.py``) take one meta-step per whole unroll of 100-1,000 inner steps: about
20 meta-steps an hour on this project's 2-core machines, for 1,553 (LSTM) or 65 (gain)
meta-parameters. Persistent evolution strategies stay unbiased for the whole run's smoothed
objective when the run is cut into windows (Vicol et al., 2021), so this recipe takes one
meta-step per 50-step window of every task's run instead: 2 to 20 meta-steps per unroll, the
estimator the published compute-light learned optimizers use (Celo2: PES, windows of 50 steps,
runs of 100-2,000).

The rule is ``general-v2`` with the adaptation-gain controller of ``adaptation_gain.py``
(``controller_hidden=8``, zero last layer: ``general-v2`` step for step at the start), and both
its LSTM with read-out and the controller are meta-trained (1,618 weights; the hand-designed
part fixed at ``general-v2``'s settings) on the ``meta-train-rescaled`` group; meta-loss of a
window: the log of the training loss at its end (a fresh minibatch); weights selected on the
``validation`` group (final training loss at 500 steps).

The steps: ``init`` writes ``runs/truncated-pes/init.pt``; ``meta-train`` resumes from
``runs/truncated-pes/ckpt`` (on a fresh machine first from the committed checkpoint
``experiments/checkpoints/truncated-pes.pt``); ``sealed`` is the sealed test, once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adaptation_gain  # noqa: E402
import candidates  # noqa: E402

RUN = Path("runs/truncated-pes")
CHECKPOINT = Path("experiments/checkpoints/truncated-pes.pt")
BASE = "general-v2"

META_TRAIN = [
    "meta-train", "--family", "meta-train-rescaled", "--rule", "general-lstm",
    "--init-weights", str(RUN / "init.pt"),
    "--horizon", "1000", "--min-horizon", "100", "--truncation", "50",
    "--objective", "final-train", "--log-meta-loss",
    "--estimator", "pes", "--estimator-kwargs", json.dumps({"sigma": 0.05, "pairs": 8}),
    "--clip-grad-per-task", "--meta-lr", "3e-3", "--meta-batch", "4", "--clip-grad", "1",
    "--iterations", "100000", "--time-budget", "40000", "--eval-every", "4",
    "--eval-tasks", "8", "--eval-family", "validation", "--eval-horizon", "500",
    "--checkpoint-every", "1", "--log-dir", str(RUN / "tb"), "--ckpt-dir", str(RUN / "ckpt"),
    "--export", str(RUN / "weights.pt"), "--resume",
]  # fmt: skip


def write_init(path: Path) -> None:
    """``general-v2`` with the zero adaptation gain, its LSTM and read-out learnable."""
    import learned_opt
    from learned_opt import load_rule, save_rule

    base, _ = load_rule(learned_opt.pretrained.path(BASE))
    rule = base.variant(**{**adaptation_gain.CONTROLLER, "learn_lstm": True})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_rule(path, rule, {"source": f"the shipped {BASE!r} weights with a zero adaptation gain"})


def main(argv: list[str] | None = None) -> int:
    return candidates.main(
        __doc__.splitlines()[0], argv, run=RUN, checkpoint=CHECKPOINT, write_init=write_init,
        meta_train=META_TRAIN, sealed=candidates.sealed_command(RUN, "truncated-pes"),
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
