"""Recipe of a default candidate: ``general-v6`` with a learned per-tensor mix of Adam's and Muon's
directions.

    python experiments/orthogonal_mix.py --steps init,meta-train --procs 2   # meta-train (resumes)
    python experiments/orthogonal_mix.py --steps validate   # best weights vs general-v6, zeroed
    python experiments/orthogonal_mix.py --dry-run          # print its commands, run nothing

Run it from the repository root. Why this part: ``general-v6``'s LSTM read-out (meta-trained
around Adam's direction) changes nothing measurable once zeroed, because the hand-designed
per-tensor step-size adaptation absorbs any change of a tensor's step size that a per-coordinate
correction makes. A matrix's *direction* is what the adaptation cannot undo, and which one is
better depends on the tensor: on the validation group Muon's direction gains 11% over Adam's at
1,000 steps in geometric mean, and Muon recipes keep Adam's for embeddings and output layers.
So the learned part here is a second read-out of the (fixed) LSTM, averaged over each matrix,
that mixes the two directions (``LSTMCorrectedAdamConfig.orthogonal_mix``): 17 weights, at zero
at the start (``general-v6`` step for step), meta-trained with the LSTM, its first read-out,
the hand-designed adaptation and the schedule fixed.

The steps:

1. ``init``: writes ``runs/orthogonal-mix/init.pt``: ``general-v6`` with the mix read-out at
   zero (``learn_lstm=False``, ``learn_schedule=False``).
2. ``meta-train``: persistent evolution strategies over whole unrolls of 100-1,000 steps (the
   horizon drawn log-uniformly per task and told to the rule; one window per task: unbiased for
   the smoothed objective of the whole run; 8 antithetic pairs, sigma 0.3: a perturbation moves
   a tensor's mix by about a quarter) on the ``meta-train`` group (MLPs, conv nets with and
   without batch norm, Elman RNNs, LSTMs, LayerNorm attention, regression); meta-loss: the log
   of the final training loss; each task's estimate clipped before the mean; weights selected on
   the ``validation`` group (final training loss at 500 steps, the horizon told). It resumes
   from ``runs/orthogonal-mix/ckpt``; on a fresh machine it first copies the committed
   checkpoint (``experiments/checkpoints/orthogonal-mix.pt``) there. ``--procs N`` runs it under
   ``torchrun`` with N processes of one thread.
3. ``sealed``: the sealed test group (``benchmarks/sealed.py``) at 100 and 1,000 steps, once
   (``SEALED_ARGS=--total-steps bash benchmarks/results/sealed/candidate.sh
   experiments/orthogonal_mix.py orthogonal-mix``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402

RUN = Path("runs/orthogonal-mix")
CHECKPOINT = Path("experiments/checkpoints/orthogonal-mix.pt")
#: The shipped weights the mix is learned around.
BASE = "general-v6"

META_TRAIN = [
    "meta-train", "--family", "meta-train", "--rule", "scheduled",
    "--init-weights", str(RUN / "init.pt"),
    "--horizon", "1000", "--min-horizon", "100", "--truncation", "1000",
    "--objective", "final-train", "--log-meta-loss",
    "--estimator", "pes", "--estimator-kwargs", json.dumps({"sigma": 0.3, "pairs": 8}),
    "--clip-grad-per-task", "--meta-lr", "3e-2", "--meta-batch", "4", "--clip-grad", "1",
    "--iterations", "100000", "--time-budget", "20000", "--eval-every", "5",
    "--eval-tasks", "8", "--eval-family", "validation", "--eval-horizon", "500",
    "--checkpoint-every", "1", "--log-dir", str(RUN / "tb"), "--ckpt-dir", str(RUN / "ckpt"),
    "--export", str(RUN / "weights.pt"), "--resume",
]  # fmt: skip


def initial_rule():
    """``general-v6`` (LSTM, read-out, adaptation and schedule fixed) with a zero mix read-out."""
    import learned_opt
    from learned_opt import load_rule
    from learned_opt.rules import build_rule

    base, _ = load_rule(learned_opt.pretrained.path(BASE))
    config = base.config()
    config["base_config"] = {**config["base_config"], "orthogonal_mix": True, "learn_lstm": False}
    config["learn_schedule"] = False
    rule = build_rule(base.kind, config)
    missing = rule.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["base.mix_bias", "base.mix_weight"], missing
    return rule


def write_init(path: Path) -> None:
    from learned_opt import save_rule

    path.parent.mkdir(parents=True, exist_ok=True)
    save_rule(path, initial_rule(), {"source": f"the shipped {BASE!r} with a zero mix read-out"})


def main(argv: list[str] | None = None) -> int:
    return candidates.main(
        (__doc__ or "").splitlines()[0], argv, run=RUN, checkpoint=CHECKPOINT,
        write_init=write_init, meta_train=META_TRAIN,
        sealed=candidates.sealed_command(RUN, "orthogonal-mix"),
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
