"""Recipe of a default candidate: ``general-v3`` with the shrinking of its step-size adaptation
retuned on the validation group.

    python experiments/adaptation_shrink.py                    # validate, weights, sealed, ship
    python experiments/adaptation_shrink.py --steps validate   # the choice alone
    python experiments/adaptation_shrink.py --dry-run          # print its commands, run nothing

Run it from the repository root. ``general-v3``'s adaptation moves each tensor's log step size
by the cosine between its gradient and its last update, a clear reversal (cosine below
``-lr_adapt_margin``) counted ``lr_adapt_shrink`` times: 2 since ``general-v2``
(``adaptation_rate.py``), chosen there with Adam's momenta (0.9, 0.999). With the faster momenta
of ``general-v3`` (0.8, 0.95) successive updates turn more often, and counting reversals less
may suit them: this recipe compares the shrink factor and the margin again on the validation
group at both horizons.

The steps:

1. ``validate``: every setting of :data:`GRID` on the validation group's 8 held-out tasks at 100
   and 1,000 steps (:func:`candidates.validate_settings`); writes
   ``benchmarks/results/validation/adaptation-shrink/``. :data:`CHOSEN` is the setting with the
   lowest mean log metric over the two horizons.
2. ``weights``: writes ``runs/adaptation-shrink/weights.pt`` (``general-v3`` with
   :data:`CHOSEN`).
3. ``sealed``: the sealed test group (``benchmarks/sealed.py``) at 100 and 1,000 steps, once.
4. ``ship``: writes the weights into ``learned_opt/pretrained/general-v4.pt`` (and ``.json``)
   with their provenance and figures (:func:`candidates.ship_settings`). It refuses to ship
   unless their sealed geometric mean is at most ``general-v3``'s at both horizons.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402

RUN = Path("runs/adaptation-shrink")
RESULTS = Path("benchmarks/results/validation/adaptation-shrink")
#: The shipped name of these weights, and the weights they derive from and replace as default.
NAME, BASE = "general-v4", "general-v3"
RECIPE = "python experiments/adaptation_shrink.py"
HORIZONS = (100, 1000)
#: The sealed runs of the base weights (``adam_betas.py``'s).
BASE_SEALED = "adam-betas"

#: The settings compared on the validation group ({}: ``general-v3`` as shipped).
GRID: list[dict[str, Any]] = [
    {},
    {"lr_adapt_shrink": 1.5},
    {"lr_adapt_shrink": 1.0},
    {"lr_adapt_margin": 0.4},
    {"lr_adapt_shrink": 1.5, "lr_adapt_margin": 0.4},
    {"lr_adapt_shrink": 1.0, "lr_adapt_margin": 0.4},
]

#: The setting the validation step chose (the candidate's configuration).
CHOSEN: dict[str, Any] = {"lr_adapt_shrink": 1.5}


def validate(out: Path) -> dict[str, Any]:
    """The metric of every :data:`GRID` setting at each horizon; writes ``out``; returns the
    chosen setting."""
    caption = (
        f"`{BASE}` with other settings of its step-size adaptation's shrinking, on the "
        "validation group's 8 held-out tasks (the meta-trainer's evaluation seeds); metric: "
        f"geometric mean of the final training loss; `{RECIPE} --steps validate`."
    )
    return candidates.validate_settings(BASE, GRID, HORIZONS, out, caption)


def ship(
    dest: Path, *, sealed: Path = candidates.SEALED, allow_worse: bool = False
) -> dict[str, Any]:
    """Write the weights as ``dest/general-v4.pt`` (and ``.json``) with their provenance and
    figures. Returns the metadata.

    Raises:
        ValueError: (unless ``allow_worse``) their sealed geometric mean is above
            ``general-v3``'s at some horizon. Nothing is written then.
    """
    return candidates.ship_settings(
        dest, name=NAME, replaces=BASE, chosen=CHOSEN, recipe=RECIPE, results=RESULTS,
        sealed_name="adaptation-shrink", horizons=HORIZONS, sealed=sealed,
        allow_worse=allow_worse, replaced_name=BASE_SEALED,
        source=f"the shipped {BASE!r} weights with the shrinking of their adaptation retuned",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return candidates.settings_main(
        __doc__.splitlines()[0], argv, base=BASE, chosen=CHOSEN, results=RESULTS, run=RUN,
        sealed_name="adaptation-shrink", name=NAME, validate=lambda: validate(RESULTS), ship=ship,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
