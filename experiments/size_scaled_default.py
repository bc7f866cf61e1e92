"""Recipe of ``general-v4-wide``: ``general-v4`` with large tensors starting at a smaller step
size (a candidate for the default, shipped by name).

    python experiments/size_scaled_default.py                    # validate, weights, sealed, ship
    python experiments/size_scaled_default.py --steps validate   # the choice alone
    python experiments/size_scaled_default.py --dry-run          # print its commands, run nothing

Run it from the repository root. ``general-v4``, like every default before it, starts each tensor
at the nominal step size 0.01; on a 3.25M-parameter character transformer that leaves training
on a plateau tuned AdamW passes in 163 steps (``benchmarks/time_to_target.py``).
``general-wide`` (``size_scaled_step.py``) fixed that for ``general-v2``'s rule by starting a
tensor of ``n`` coordinates above ``lr_size_ref`` at ``sqrt(lr_size_ref / n)`` of the nominal
step. This recipe applies the same change to ``general-v4`` and chooses the reference again,
smaller values included (4,096 was the smallest compared for ``general-wide``).

The steps:

1. ``validate``: every :data:`GRID` value on ``size_scaled_step``'s wide validation tasks (2
   seeds, 1,000 steps) and, where the reference is below the validation group's largest tensor,
   on its 8 held-out tasks at 100 and 1,000 steps (:func:`size_scaled_step.validate`); writes
   ``benchmarks/results/validation/size-scaled-default/``. :data:`CHOSEN` is the value with the
   lowest mean log metric / ``general-v4``'s over the cells measured.
2. ``weights``: ``runs/size-scaled-default/weights.pt`` (``general-v4`` with :data:`CHOSEN`).
3. ``sealed``: the sealed test group at 100 and 1,000 steps, once.
4. ``ship``: ``learned_opt/pretrained/general-v4-wide.{pt,json}`` with their provenance and
   figures (:func:`candidates.ship_settings`), shipped by name beside the default: their sealed
   geometric mean at 100 steps is above ``general-v4``'s (``figures.default_candidate``
   records whether it is at most that at both horizons, the condition for the default).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402
import size_scaled_step  # noqa: E402

RUN = Path("runs/size-scaled-default")
RESULTS = Path("benchmarks/results/validation/size-scaled-default")
#: The shipped name of these weights, and the weights they derive from.
NAME, BASE = "general-v4-wide", "general-v4"
#: The sealed runs of the base weights (``adaptation_shrink.py``'s).
BASE_SEALED = "adaptation-shrink"
RECIPE = "python experiments/size_scaled_default.py"
HORIZONS = size_scaled_step.HORIZONS
#: The values of ``lr_size_ref`` compared (0: ``general-v4`` as shipped).
GRID = (0.0, 1024.0, 2048.0, 4096.0)
#: The value the validation step chose.
CHOSEN = 1024.0


def validate(out: Path, procs: int = 2) -> float:
    """Every :data:`GRID` value with ``general-v4``; writes ``out``; returns the chosen value."""
    return size_scaled_step.validate(out, procs, base=BASE, grid=GRID, recipe=RECIPE)


def write_weights(path: Path) -> None:
    """``general-v4`` with ``lr_size_ref`` = :data:`CHOSEN`."""
    from learned_opt import save_rule

    path.parent.mkdir(parents=True, exist_ok=True)
    source = f"the shipped {BASE!r} weights with lr_size_ref={CHOSEN:g}, chosen on validation"
    save_rule(path, size_scaled_step.rule_with_reference(CHOSEN, BASE), {"source": source})


def ship(dest: Path, *, sealed: Path = candidates.SEALED) -> dict[str, Any]:
    """Write the weights as ``dest/general-v4-wide.pt`` (and ``.json``) with their provenance
    and figures, and whether their sealed geometric mean is at most ``general-v4``'s at both
    horizons. Returns the metadata."""
    validation = size_scaled_step.validation_figures(
        RESULTS / "records.jsonl", CHOSEN, BASE, RECIPE
    )
    return candidates.ship_settings(
        dest, name=NAME, replaces=BASE, chosen={"lr_size_ref": CHOSEN}, recipe=RECIPE,
        results=RESULTS, sealed_name="size-scaled-default", horizons=HORIZONS, sealed=sealed,
        allow_worse=True, replaced_name=BASE_SEALED, validation=validation,
        source=f"the shipped {BASE!r} weights with large tensors starting at a smaller step",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = candidates.settings_parser(__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2, help="processes of the validate step")
    args = parser.parse_args(argv)
    return candidates.run_settings_steps(
        args, parser, results=RESULTS, run=RUN, sealed_name="size-scaled-default", name=NAME,
        chosen=CHOSEN, validate=lambda: validate(RESULTS, args.procs),
        write_weights=write_weights, ship=ship,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
