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

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402

RUN = Path("runs/adaptation-rate")
RESULTS = Path("benchmarks/results/validation/adaptation-rate")
SEALED = Path("benchmarks/results/sealed")
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


def write_weights(path: Path) -> None:
    """The shipped weights with :data:`CHOSEN`."""
    from learned_opt import load_rule, pretrained, save_rule

    base, _ = load_rule(pretrained.path(REPLACES))
    path.parent.mkdir(parents=True, exist_ok=True)
    source = f"the shipped {REPLACES!r} weights with {json.dumps(CHOSEN)}, chosen on validation"
    save_rule(path, base.variant(**CHOSEN), {"source": source})


def sealed_figures(directory: Path) -> dict[str, Any]:
    """The figures of one ``benchmarks/sealed.py`` run (its ``summary.jsonl``): for the learned
    optimizer and each other optimizer, the geometric mean over the tasks of the final training
    loss / tuned constant Adam's, the worst task and the seeds won; the learned optimizer's ratio
    per task."""
    from learned_opt.evaluate import geometric_mean
    from learned_opt.report import read_jsonl

    rows = read_jsonl(directory / "summary.jsonl")
    (meta,) = [r for r in rows if r["kind"] == "meta"]
    rows = [r for r in rows if r["kind"] == "summary" and r["optimizer"] != "adam"]
    optimizers: dict[str, dict[str, Any]] = {}
    for name in sorted({r["optimizer"] for r in rows}):
        mine = [r for r in rows if r["optimizer"] == name]
        ratios = [r["ratio_train"] for r in mine]
        optimizers[name] = {
            "geometric_mean": round(geometric_mean(ratios), 4),
            "worst": round(max(ratios), 4),
            "seeds_won": f"{sum(r['won'] for r in mine)}/{sum(r['seeds'] for r in mine)}",
        }
    (steps,) = {r["steps"] for r in rows}
    learned = {r["task"]: round(r["ratio_train"], 4) for r in rows if r["optimizer"] == "learned"}
    return {
        "results": str(directory),
        "command": meta["command"],
        "commit": meta["commit"],
        "steps": steps,
        **optimizers["learned"],
        "ratios": learned,
        "optimizers": optimizers,
    }


def validation_figures(records: Path) -> dict[str, Any]:
    """The validation step's metric of :data:`CHOSEN` and of the shipped settings, per horizon."""
    from learned_opt.report import read_jsonl

    rows = read_jsonl(records)
    metric = {(json.dumps(r["setting"]), r["steps"]): r["metric"] for r in rows}
    return {
        "command": "python experiments/adaptation_rate.py --steps validate",
        "results": str(records.parent),
        "metric": "geometric mean of the final training loss over the validation group's 8 tasks",
        "by_steps": {
            str(h): {"chosen": round(metric[json.dumps(CHOSEN), h], 4),
                     REPLACES: round(metric["{}", h], 4)}
            for h in HORIZONS
        },
        "selection_seconds": round(sum(r["seconds"] for r in rows), 1),
    }  # fmt: skip


def ship(dest: Path, *, sealed: Path = SEALED, allow_worse: bool = False) -> dict[str, Any]:
    """Write the weights as ``dest/general-v2.pt`` (and ``.json``) with their provenance and
    figures. Returns the metadata.

    Raises:
        ValueError: (unless ``allow_worse``) their sealed geometric mean is above that of the
            weights they replace at some horizon. Nothing is written then.
    """
    from learned_opt import load_rule, pretrained, save_rule
    from learned_opt.cli import git_commit

    base, meta = load_rule(pretrained.path(REPLACES))
    by_steps = {}
    for horizon in HORIZONS:
        mine = sealed_figures(sealed / f"adaptation-rate-{horizon}")
        before = sealed_figures(sealed / f"{REPLACES}-{horizon}")
        if mine["geometric_mean"] > before["geometric_mean"] and not allow_worse:
            raise ValueError(
                f"{horizon} steps: sealed geometric mean {mine['geometric_mean']} is above "
                f"{REPLACES!r}'s {before['geometric_mean']}; not shipping"
            )
        by_steps[str(horizon)] = {**mine, f"replaced_{REPLACES}": before}
    validation = validation_figures(RESULTS / "records.jsonl")
    meta = {key: value for key, value in meta.items() if key not in ("shipped", "figures")}
    meta.update(
        source=f"the shipped {REPLACES!r} weights with their step-size adaptation retuned",
        derived_from={
            "weights": REPLACES,
            "weights_sha256": meta.pop("weights_sha256", None),
            "settings": CHOSEN,
            "chosen_on_validation": validation,
        },
        recipe=RECIPE,
        budget={**meta.get("budget", {}), "selection_seconds": validation["selection_seconds"]},
        figures={
            "benchmark": "benchmarks/sealed.py: mean final training loss / tuned constant "
            "Adam's per task; geometric mean over the sealed test group's tasks",
            "worst_ratio": max(entry["worst"] for entry in by_steps.values()),
            "by_steps": by_steps,
        },
        shipped={"command": f"{RECIPE} --steps ship", "commit": git_commit()},
    )
    dest.mkdir(parents=True, exist_ok=True)
    save_rule(dest / f"{NAME}.pt", base.variant(**CHOSEN), meta)
    (dest / f"{NAME}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = candidates.settings_parser(__doc__.splitlines()[0])
    parser.add_argument("--allow-worse", action="store_true", help="ship even if worse sealed")
    args = parser.parse_args(argv)
    return candidates.run_settings_steps(
        args, parser, results=RESULTS, run=RUN, sealed_name="adaptation-rate", name=NAME,
        chosen=CHOSEN, validate=lambda: validate(RESULTS), write_weights=write_weights,
        ship=lambda dest: ship(dest, allow_worse=args.allow_worse),
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
