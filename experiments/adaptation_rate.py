"""Recipe of the default weights, ``general-v2``: ``general`` with its step-size adaptation
retuned on the validation group.

    python experiments/adaptation_rate.py                    # validate, weights, sealed, ship
    python experiments/adaptation_rate.py --steps validate   # the choice alone
    python experiments/adaptation_rate.py --dry-run          # print its commands, run nothing

Run it from the repository root. The rule is the shipped ``general`` (the LSTM-corrected Adam
rule, its LSTM and read-out as shipped) with other settings of its hand-designed per-tensor
step-size adaptation, chosen on the validation group. ``general`` adapts at a rate of 0.1 per step
(``lr_adapt``) and count a clear reversal (a cosine below ``-lr_adapt_margin``) three times
(``lr_adapt_shrink``); on the validation tasks the adapted step size then keeps moving long after
it has found its scale, and a run of 1,000 steps ends higher than with a slower adaptation.

The steps:

1. ``validate``: every setting of :data:`GRID` on the validation group's 8 held-out tasks (the
   meta-trainer's evaluation seeds; final training loss, geometric mean over the tasks) at 100
   and 1,000 steps; writes ``benchmarks/results/validation/adaptation-rate/`` (``table.md``,
   ``records.jsonl``). :data:`CHOSEN` is the setting with the lowest mean log metric over the two
   horizons.
2. ``weights``: writes ``runs/adaptation-rate/weights.pt`` (the shipped weights, :data:`CHOSEN`).
3. ``sealed``: the sealed test group (``benchmarks/sealed.py``) at 100 and 1,000 steps, once.
4. ``ship``: writes the weights into ``learned_opt/pretrained/general-v2.pt`` (and ``.json``)
   with metadata: the meta-training record of the LSTM (``general``'s), the settings changed and
   the validation figures that chose them, and the sealed figures of these weights and of the
   weights they replace as the default (``benchmarks/results/sealed/``). It refuses to ship
   unless their sealed geometric mean is at most the replaced weights' at both horizons.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402

RUN = Path("runs/adaptation-rate")
RESULTS = Path("benchmarks/results/validation/adaptation-rate")
SEALED = candidates.SEALED
#: The shipped name of these weights, and the weights they replace as the default.
NAME, REPLACES = "general-v2", "general"
HORIZONS = (100, 1000)
RECIPE = "python experiments/adaptation_rate.py"

#: The settings compared on the validation group ({}: as shipped: rate 0.1, shrink 3, margin 0.2).
GRID: list[dict[str, float]] = [
    {},
    {"lr_adapt": 0.05},
    {"lr_adapt": 0.025},
    {"lr_adapt": 0.0125},
    {"lr_adapt_shrink": 2.0},
    {"lr_adapt_margin": 0.4},
    {"lr_adapt": 0.025, "lr_adapt_shrink": 2.0},
    {"lr_adapt": 0.025, "lr_adapt_margin": 0.4},
]

#: The setting the validation step chose (the candidate's configuration).
CHOSEN = {"lr_adapt": 0.025, "lr_adapt_shrink": 2.0}


def validate(out: Path) -> dict[str, float]:
    """The metric of every :data:`GRID` setting at each horizon; writes ``out``; returns the
    chosen setting."""
    caption = (
        "The shipped default with other settings of its step-size adaptation, on the validation "
        "group's 8 held-out tasks (the meta-trainer's evaluation seeds); metric: geometric mean "
        "of the final training loss; `python experiments/adaptation_rate.py --steps validate`."
    )
    return candidates.validate_settings(REPLACES, GRID, HORIZONS, out, caption)


def ship(dest: Path, *, sealed: Path = SEALED, allow_worse: bool = False) -> dict[str, Any]:
    """Write the weights as ``dest/general-v2.pt`` (and ``.json``) with their provenance and
    figures (:func:`candidates.ship_settings`). Returns the metadata.

    Raises:
        ValueError: (unless ``allow_worse``) their sealed geometric mean is above that of the
            weights they replace at some horizon. Nothing is written then.
    """
    return candidates.ship_settings(
        dest, name=NAME, replaces=REPLACES, chosen=CHOSEN, recipe=RECIPE, results=RESULTS,
        sealed_name="adaptation-rate", horizons=HORIZONS, sealed=sealed, allow_worse=allow_worse,
        source=f"the shipped {REPLACES!r} weights with their step-size adaptation retuned",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return candidates.settings_main(
        __doc__.splitlines()[0], argv, base=REPLACES, chosen=CHOSEN, results=RESULTS, run=RUN,
        sealed_name="adaptation-rate", name=NAME, validate=lambda: validate(RESULTS), ship=ship,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
