"""Recipe of a default candidate: ``general-v7`` without its per-coordinate LSTM (the learned
step-size controller around Adam's and Muon's directions alone).

    python experiments/lean_default.py                   # validate, weights, sealed, ship
    python experiments/lean_default.py --steps validate  # the comparison on the validation group
    python experiments/lean_default.py --dry-run         # print its commands, run nothing

Run it from the repository root. Why: every measurable gain of ``general-v7``'s learned part is
its per-tensor step sizes. Its LSTM's per-coordinate read-out, zeroed alone, leaves the
meta-trainer's 8 validation tasks 0.4% lower at 100 steps and 0.3% higher at 500 (the metric's
noise: 0.8%; ``benchmarks/results/ablations/general-v7-{100,500}/``), while the LSTM is most of
the rule's cost: 128 of its 160 bytes of state per parameter (hidden and cell states of 16
units, four momenta and a fast second moment that only the LSTM reads) and most of its step's
arithmetic. Without it (``LSTMCorrectedAdamConfig(lstm=False)``) the rule keeps Adam's momentum
and second moment and the last direction, 12 bytes per parameter, and its step is the
hand-designed direction moved by the learned controller's step size: ``general-v7`` with its
read-out at zero, step for step (``tests/test_lean_rule.py``).

The rule, fixed before any of its runs:

- ``sealed`` only if on the validation group (5 members x 5 seeds, 100 and 1,000 steps, each
  told the horizon and not) its geometric mean of the final-loss ratios to tuned Adam is at most
  1% above ``general-v7``'s in each of the four runs (``validate``; the group's resolution is
  about 1%);
- ``ship``: as the default if its sealed geometric means are at most ``general-v7``'s in all
  four runs; otherwise by name beside it (``general-v7-lean``, for the memory and the step
  time), its sealed figures recorded either way.

The steps:

1. ``validate``: ``benchmarks/sealed.py --group validation`` on the weights of step 2, at both
   horizons, told and not (``--optimizers learned``); ``general-v7``'s runs of the same command
   are ``benchmarks/results/validation/general-v7{,-horizon-free}/``. Writes
   ``benchmarks/results/validation/lean-default{,-horizon-free}/``.
2. ``weights``: ``runs/lean-default/weights.pt``, ``general-v7`` with ``lstm=False``.
3. ``sealed``: the sealed test group at 100 and 1,000 steps, told the horizon and not, once
   (``SEALED_ARGS="--total-steps --optimizers learned" bash benchmarks/results/sealed/candidate.sh
   experiments/lean_default.py lean-default``, and ``SEALED_ARGS="--optimizers learned"`` into
   ``lean-default-horizon-free``).
4. ``ship``: the weights with their provenance and sealed figures beside ``general-v7``'s.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402

NAME = "lean-default"
RUN = Path("runs") / NAME
#: The weights it changes, and what it changes.
BASE = "general-v7"
SETTINGS = {"lstm": False}
#: ``general-v7``'s runs on the validation group (told; not told), and on the sealed group.
BASE_VALIDATION = Path("benchmarks/results/validation/general-v7")
BASE_SEALED, BASE_SEALED_FREE = "learned-adaptation", "learned-adaptation-horizon-free"


def lean_rule():
    """``general-v7`` with :data:`SETTINGS` (its schedule around the changed base rule)."""
    import copy

    from learned_opt import load_rule, pretrained

    rule, _ = load_rule(pretrained.path(BASE))
    lean = copy.deepcopy(rule)
    lean.base = rule.base.variant(**SETTINGS)
    return lean
