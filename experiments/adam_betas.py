"""Recipe of a default candidate: ``general-v2`` with the momenta of its Adam direction retuned on
the validation group.

    python experiments/adam_betas.py                    # validate, weights, sealed, ship
    python experiments/adam_betas.py --steps validate   # the choice alone
    python experiments/adam_betas.py --dry-run          # print its commands, run nothing

Run it from the repository root. ``general-v2``'s learned parts (the LSTM's read-out, which
scales the step per coordinate) change its validation metric by less than 1% whatever their
weights (zeroed, tripled, or meta-trained for hundreds of PES steps: ``truncated_pes.py``), while
the direction the step takes is set by hand-designed momenta, Adam's (0.9, 0.999): on the
meta-trainer's validation metric at 500 steps, ``beta2=0.95`` gave 0.6018 and ``beta1=0.8``
0.6084 against 0.6208. This recipe chooses them on the validation group at both horizons.

The steps:

1. ``validate``: every setting of :data:`GRID` on the validation group's 8 held-out tasks at 100
   and 1,000 steps (:func:`candidates.validate_settings`); writes
   ``benchmarks/results/validation/adam-betas/``. :data:`CHOSEN` is the setting with the lowest
   mean log metric over the two horizons.
2. ``weights``: writes ``runs/adam-betas/weights.pt`` (``general-v2`` with :data:`CHOSEN`).
3. ``sealed``: the sealed test group (``benchmarks/sealed.py``) at 100 and 1,000 steps, once.
4. ``ship``: writes the weights into ``learned_opt/pretrained/general-v3.pt`` (and ``.json``)
   with their provenance and figures (:func:`candidates.ship_settings`). It refuses to ship
   unless their sealed geometric mean is at most ``general-v2``'s at both horizons.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402

RUN = Path("runs/adam-betas")
RESULTS = Path("benchmarks/results/validation/adam-betas")
#: The shipped name of these weights, and the weights they derive from and replace as default.
NAME, BASE = "general-v3", "general-v2"
RECIPE = "python experiments/adam_betas.py"
HORIZONS = (100, 1000)

#: The settings compared on the validation group ({}: ``general-v2`` as shipped).
GRID: list[dict[str, Any]] = [
    {},
    {"beta1": 0.8},
    {"beta2": 0.99},
    {"beta2": 0.95},
    {"beta2": 0.9},
    {"beta1": 0.8, "beta2": 0.95},
    {"beta1": 0.85, "beta2": 0.95},
]

#: The setting the validation step chose (the candidate's configuration).
CHOSEN: dict[str, Any] = {"beta1": 0.8, "beta2": 0.95}


def validate(out: Path) -> dict[str, Any]:
    """The metric of every :data:`GRID` setting at each horizon; writes ``out``; returns the
    chosen setting."""
    caption = (
        f"`{BASE}` with other momenta of its Adam direction, on the validation group's 8 "
        "held-out tasks (the meta-trainer's evaluation seeds); metric: geometric mean of the "
        "final training loss; `python experiments/adam_betas.py --steps validate`."
    )
    return candidates.validate_settings(BASE, GRID, HORIZONS, out, caption)


def ship(
    dest: Path, *, sealed: Path = candidates.SEALED, allow_worse: bool = False
) -> dict[str, Any]:
    """Write the weights as ``dest/general-v3.pt`` (and ``.json``) with their provenance and
    figures. Returns the metadata.

    Raises:
        ValueError: (unless ``allow_worse``) their sealed geometric mean is above
            ``general-v2``'s at some horizon. Nothing is written then.
    """
    return candidates.ship_settings(
        dest, name=NAME, replaces=BASE, chosen=CHOSEN, recipe=RECIPE, results=RESULTS,
        sealed_name="adam-betas", horizons=HORIZONS, sealed=sealed, allow_worse=allow_worse,
        replaced_name=f"{BASE}-regrouped",
        source=f"the shipped {BASE!r} weights with the momenta of their Adam direction retuned",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return candidates.settings_main(
        __doc__.splitlines()[0], argv, base=BASE, chosen=CHOSEN, results=RESULTS, run=RUN,
        sealed_name="adam-betas", name=NAME, validate=lambda: validate(RESULTS), ship=ship,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
