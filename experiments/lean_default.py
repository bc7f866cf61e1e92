"""Recipe of a default candidate: ``general-v7`` without its per-coordinate LSTM (the learned
step-size controller around Adam's and Muon's directions alone).

    python experiments/lean_default.py                   # validate, weights, ship
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
   ``benchmarks/results/validation/lean-default{,-horizon-free}/`` and prints the comparison.
   (The committed runs were made on ``general-v7`` with its read-out at zero,
   ``runs/lean-default/readout-zeroed.pt``, before ``lstm=False`` existed: the same steps, bit
   for bit, as ``tests/test_lean_rule.py`` checks.)
2. ``weights``: ``runs/lean-default/weights.pt``, ``general-v7`` with ``lstm=False``.
3. ``sealed`` (not run by this script): the sealed test group at 100 and 1,000 steps, told the
   horizon and not, once (``SEALED_ARGS="--total-steps --optimizers learned" bash
   benchmarks/results/sealed/candidate.sh experiments/lean_default.py lean-default``; not told:
   ``python benchmarks/sealed.py --weights runs/lean-default/weights.pt --optimizers learned
   --steps H --out benchmarks/results/sealed/lean-default-horizon-free-H``).
4. ``ship``: the weights with their provenance and sealed figures beside ``general-v7``'s.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    from learned_opt import load_rule, pretrained

    rule, _ = load_rule(pretrained.path(BASE))
    rule.base = rule.base.variant(**SETTINGS)
    return rule


#: Where the validation runs are (told the horizon; not told: ``-horizon-free``).
RESULTS = Path("benchmarks/results/validation") / NAME
RECIPE = "python experiments/lean_default.py"
HORIZONS = candidates.HORIZONS
#: The shipped names: as the default, or beside it.
DEFAULT_NAME, SIDE_NAME = "general-v8", "general-v7-lean"
#: How far above ``general-v7``'s the validation figures may be (the rule above).
VALIDATION_MARGIN = 1.01


def _results(told: bool) -> Path:
    return RESULTS if told else RESULTS.parent / f"{NAME}-horizon-free"


def _base_results(told: bool) -> Path:
    return BASE_VALIDATION if told else BASE_VALIDATION.parent / f"{BASE}-horizon-free"


def validation_commands() -> list[list[str]]:
    """The four validation runs (after ``python``): told the horizon and not, 100 and 1,000."""
    return [
        ["benchmarks/sealed.py", "--group", "validation", "--weights", str(RUN / "weights.pt"),
         "--optimizers", "learned", "--threads", "1", "--steps", str(h),
         *(["--total-steps"] if told else []), "--out", str(_results(told) / str(h))]
        for told in (True, False) for h in HORIZONS
    ]  # fmt: skip


def _geometric_mean(directory: Path) -> float:
    from learned_opt.evaluate import geometric_mean
    from learned_opt.report import read_jsonl

    rows = read_jsonl(directory / "summary.jsonl")
    return geometric_mean(
        [r["ratio_train"] for r in rows if r["kind"] == "summary" and r["optimizer"] == "learned"]
    )


def _seconds(directory: Path) -> float:
    """How long one validation run took (its record's ``seconds``)."""
    from learned_opt.report import read_jsonl

    (meta,) = [r for r in read_jsonl(directory / "summary.jsonl") if r["kind"] == "meta"]
    return float(meta["seconds"])


def validation_figures() -> dict[str, Any]:
    """Per run (told / not told, horizon): the lean rule's and ``general-v7``'s geometric means
    on the validation group, and whether the rule above lets the lean rule be sealed."""
    runs = {}
    for told in (True, False):
        for h in HORIZONS:
            lean = _geometric_mean(_results(told) / str(h))
            base = _geometric_mean(_base_results(told) / str(h))
            runs[f"{'told' if told else 'not told'}, {h}"] = {
                "lean": round(lean, 4),
                BASE: round(base, 4),
                "ratio": round(lean / base, 4),
            }
    passed = all(r["ratio"] <= VALIDATION_MARGIN for r in runs.values())
    return {"runs": runs, "sealed_by_the_rule": passed}


def validate(procs: int = 2) -> dict[str, Any]:
    """Run the validation commands (``procs`` at a time) and print the comparison."""
    from concurrent.futures import ThreadPoolExecutor

    def one(command: list[str]) -> None:
        print(shlex.join(["python", *command]), flush=True)
        subprocess.run([sys.executable, *command], check=True)

    with ThreadPoolExecutor(procs) as pool:
        list(pool.map(one, validation_commands()))
    found = validation_figures()
    print(json.dumps(found, indent=2), flush=True)
    return found


def write_weights(path: Path) -> None:
    """:func:`lean_rule` as ``path``."""
    from learned_opt import save_rule

    path.parent.mkdir(parents=True, exist_ok=True)
    source = f"the shipped {BASE!r} weights without the per-coordinate LSTM ({SETTINGS})"
    save_rule(path, lean_rule(), {"source": source})


def ship(dest: Path, *, sealed: Path = candidates.SEALED) -> dict[str, Any]:
    """Write :func:`lean_rule` with its provenance, validation and sealed figures beside
    ``general-v7``'s: as :data:`DEFAULT_NAME` if its sealed geometric means are at most
    ``general-v7``'s in all four runs, else as :data:`SIDE_NAME`. Returns the metadata."""
    from learned_opt import load_rule, pretrained

    told = candidates.sealed_comparison(
        sealed, NAME, BASE, HORIZONS, replaced_name=BASE_SEALED, benchmark=candidates.TOLD_HORIZON
    )
    free = candidates.sealed_comparison(
        sealed, f"{NAME}-horizon-free", BASE, HORIZONS, replaced_name=BASE_SEALED_FREE,
        benchmark="benchmarks/sealed.py (not told the horizon), as above",
    )  # fmt: skip
    default = told["default_candidate"] and free["default_candidate"]
    _, meta = load_rule(pretrained.path(BASE))
    validation = {
        "command": f"{RECIPE} --steps validate",
        "results": [str(_results(True)), str(_results(False))],
        "metric": "geometric mean over the validation group (5 members x 5 seeds) of the final "
        "training loss / tuned Adam's",
        **validation_figures(),
        "selection_seconds": round(sum(_seconds(_results(t) / str(h))
                                       for t in (True, False) for h in HORIZONS), 1),
    }  # fmt: skip
    return candidates.write_derived(
        dest, DEFAULT_NAME if default else SIDE_NAME, lean_rule(), derived_from=BASE,
        base_meta=meta, source=f"the shipped {BASE!r} weights without the per-coordinate LSTM",
        settings=SETTINGS, validation=validation, recipe=RECIPE,
        figures={**told, "horizon_free": free},
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = candidates.settings_parser((__doc__ or "").splitlines()[0])
    parser.add_argument("--procs", type=int, default=2, help="processes of the validate step")
    parser.set_defaults(steps="validate,weights,ship")  # sealed: by candidate.sh (above)
    args = parser.parse_args(argv)
    return candidates.run_settings_steps(
        args, parser, results=RESULTS, run=RUN, sealed_name=NAME, name=SIDE_NAME, chosen=True,
        validate=lambda: validate(args.procs)["sealed_by_the_rule"], write_weights=write_weights,
        ship=ship,
        sealed_skip=lambda: "run by benchmarks/results/sealed/candidate.sh, told and not (above)",
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
