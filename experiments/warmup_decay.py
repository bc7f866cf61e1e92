"""Recipe of ``general-v6``: ``general-v4`` with a hand-designed warm-up and decay, chosen again.

    python experiments/warmup_decay.py                   # validate: compare the shapes
    python experiments/warmup_decay.py --steps weights   # the chosen shape as weights
    SEALED_ARGS=--total-steps bash benchmarks/results/sealed/candidate.sh \
        experiments/warmup_decay.py warmup-decay         # its sealed test, once
    python experiments/warmup_decay.py --steps ship      # after its sealed test

Run it from the repository root. The steps of ``experiments/horizon_decay.py`` (``general-v5``'s
recipe) with their own settings (:data:`RECIPE`): every shape of
:data:`horizon_decay.DECAYS` (linear warm-ups over 1% to 30% of the run, linear decays over its
last 10% to 50%, cosine decays) compared on the validation group after its small tables got
noisy labels (``benchmarks/results/validation/warmup-decay/``; on the former group one iris task
near zero loss carried the comparison, and chose ``general-v5``'s 2% warm-up; 39 shapes, 25
minutes on 2 processes). The shape with the lowest mean log metric, :data:`CHOSEN`: a linear
warm-up over the first 30% of the run and a linear decay over its last 20% (0.9157 / 0.6431 at
100 / 1,000 steps against ``general-v4``'s 0.9356 / 0.7158 and ``general-v5``'s 0.9156 /
0.6725; warm-ups of 10% to 30% are within 0.5% of each other). Its sealed test, told the
horizon: 0.947 / 0.911 of tuned Adam at 100 / 1,000 steps against ``general-v5``'s 0.946 /
0.903, so it is not shipped; ``ship`` would write it as ``general-v6``, its sealed figures beside
``general-v5``'s.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from horizon_decay import DECAYS, Recipe, main, ship, write_weights  # noqa: E402

RECIPE = Recipe(
    name="general-v6",
    chosen={"warmup": 0.3, "tail": 0.2},
    script="experiments/warmup_decay.py",
    validation=Path("benchmarks/results/validation/warmup-decay"),
    sealed_name="warmup-decay",
    replaces="general-v5",
    replaced_sealed="horizon-decay",
    decays=tuple(DECAYS),
)
CHOSEN, NAME = RECIPE.chosen, RECIPE.name
write_weights = partial(write_weights, recipe=RECIPE)
ship = partial(ship, recipe=RECIPE)


if __name__ == "__main__":
    raise SystemExit(main(recipe=RECIPE, doc=__doc__))
