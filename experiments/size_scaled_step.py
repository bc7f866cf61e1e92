"""Recipe of ``general-wide``: the default with large tensors starting at a smaller step size.

    python experiments/size_scaled_step.py                    # validate, weights, sealed, ship
    python experiments/size_scaled_step.py --steps validate   # the choice alone
    python experiments/size_scaled_step.py --dry-run          # print its commands, run nothing

Run it from the repository root. ``general-v2`` starts every tensor at the nominal step size
0.01 (ten times a tuned Adam's rate on a transformer of width 256); its step-size adaptation
then shrinks it, but too late: on wide models the first hundred steps of large steps leave the
training at a plateau that later, smaller steps do not leave. The candidate starts a tensor of
``n`` coordinates above ``lr_size_ref`` at ``sqrt(lr_size_ref / n)`` of the nominal step size
(``LSTMCorrectedAdamConfig.lr_size_ref``; for a square matrix one over its width, as muP scales
Adam's rate for hidden layers) and adapts from there as before.

The steps:

1. ``validate``: every :data:`GRID` value of ``lr_size_ref`` on :data:`WIDE`, wide versions of
   the validation group's architectures on its data parts (tensors of 70k-260k coordinates;
   the validation group's own tasks have none above 7k), 2 seeds, 1,000 steps; metric: the mean
   minibatch loss over the 10 steps before step 100 and before step 1,000 (the rule is
   horizon-free: the first 100 steps of a 1,000-step run are the 100-step run), geometric mean
   over tasks and seeds. Settings with a reference below the validation group's largest tensor
   are also run on its 8 held-out tasks (final training loss, 100 and 1,000 steps); the others
   take the same steps there. Writes ``benchmarks/results/validation/size-scaled-step/``.
   :data:`CHOSEN` is the setting with the lowest mean log metric / ``general-v2``'s over the
   cells measured.
2. ``weights``: ``runs/size-scaled-step/weights.pt`` (``general-v2`` with :data:`CHOSEN`).
3. ``sealed``: the sealed test group at 100 and 1,000 steps, once; unless no sealed task has
   a tensor above :data:`CHOSEN` (the largest has 9,408 coordinates): then the candidate takes
   ``general-v2``'s steps there bit for bit (tested), and ``general-v2``'s sealed runs are its.
4. ``ship``: ``learned_opt/pretrained/general-wide.{pt,json}`` with the meta-training record of
   the LSTM, the setting and the validation figures that chose it, the sealed figures of these
   weights and of ``general-v2``, and whether they are at most ``general-v2``'s at both horizons
   (``figures.default_candidate``: the condition for making them the default).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402

RUN = Path("runs/size-scaled-step")
RESULTS = Path("benchmarks/results/validation/size-scaled-step")
SEALED = candidates.SEALED
NAME, REPLACES = "general-wide", "general-v2"
HORIZONS = (100, 1000)
SEEDS = (0, 1)
RECIPE = "python experiments/size_scaled_step.py"
#: The values of ``lr_size_ref`` compared (0: ``general-v2`` as shipped).
GRID = (0.0, 4096.0, 16384.0, 65536.0)
#: The value the validation step chose.
CHOSEN = 4096.0


def _wide() -> dict[str, Any]:
    from learned_opt.tasks.nets import SourceMLPFamily
    from learned_opt.tasks.patches import PatchSequenceFamily
    from learned_opt.tasks.sequence import CharLMFamily

    return {
        "shapes-transformer-192": PatchSequenceFamily(
            "shapes", "val", ("transformer",), (192,), (2,), (4,), (64,), patch=4
        ),
        "corpus-rnn-lm-384": CharLMFamily("val", ("rnn",), (384,), (1,), (1,), (32,), (32,)),
        "friedman3-mlp-512": SourceMLPFamily("friedman3", "val", (512,), (2,), ("relu",), (64,)),
    }


#: The wide validation tasks: name -> family (built on use).
WIDE: Callable[[], dict[str, Any]] = _wide


def rule_with_reference(ref: float, base: str | None = None) -> Any:
    """The shipped weights ``base`` (default :data:`REPLACES`) with ``lr_size_ref`` = ``ref``
    (0: as shipped)."""
    from learned_opt import load_rule, pretrained

    rule, _ = load_rule(pretrained.path(base or REPLACES))
    return rule.variant(lr_size_ref=ref) if ref else rule


def _wide_run(job: tuple[str, float, int, str]) -> dict[str, Any]:
    """One 1,000-step run of a wide task by the weights ``base`` (in a worker process, one
    thread)."""
    import torch

    from learned_opt import LearnedOptimizer
    from learned_opt.evaluate import run_optimizer

    torch.set_num_threads(1)
    task, ref, seed, base = job
    rule = rule_with_reference(ref, base)
    start = time.perf_counter()
    run = run_optimizer(WIDE()[task], seed, lambda p, lr: LearnedOptimizer(p, rule, lr=lr), 1.0,
                        max(HORIZONS))  # fmt: skip
    metric = {str(h): sum(run.losses[h - 10 : h]) / 10 for h in HORIZONS}
    return {"group": "wide", "task": task, "lr_size_ref": ref, "seed": seed, "metric": metric,
            "seconds": time.perf_counter() - start}  # fmt: skip


def _validation_runs(ref: float, base: str | None = None) -> list[dict[str, Any]]:
    """The validation group's 8 held-out tasks at each horizon (final training loss)."""
    from learned_opt import LearnedOptimizer
    from learned_opt.evaluate import run_optimizer
    from learned_opt.outer.config import MetaTrainConfig
    from learned_opt.outer.held_out import HeldOut
    from learned_opt.tasks import make_family

    rule, records = rule_with_reference(ref, base), []
    for horizon in HORIZONS:
        config = MetaTrainConfig(
            objective="final-train", log_meta_loss=True, eval_family="validation",
            eval_tasks=8, eval_horizon=horizon,
        )  # fmt: skip
        held = HeldOut(config, make_family("validation"))
        start = time.perf_counter()
        runs = [run_optimizer(held.family, s, lambda p, lr: LearnedOptimizer(p, rule, lr=lr),
                              1.0, horizon) for s in held.seeds]  # fmt: skip
        records.append({"group": "validation", "lr_size_ref": ref, "steps": horizon,
                        "metric": held.aggregate([r.final_train_loss for r in runs]),
                        "seconds": time.perf_counter() - start})  # fmt: skip
    return records


def _largest_tensor(tasks: list[tuple[Any, int]]) -> int:
    """The most coordinates of any parameter tensor of these (family, seed) tasks."""
    import torch

    largest = 0
    for family, seed in tasks:
        task = family.sample(torch.Generator().manual_seed(seed))
        params = task.init_params(torch.Generator().manual_seed(seed + 1))
        largest = max(largest, *(p.numel() for p in params.values()))
    return largest


def _largest_validation_tensor() -> int:
    from learned_opt.outer.config import MetaTrainConfig
    from learned_opt.outer.held_out import HeldOut
    from learned_opt.tasks import make_family

    config = MetaTrainConfig(eval_family="validation", eval_tasks=8)
    held = HeldOut(config, make_family("validation"))
    return _largest_tensor([(held.family, seed) for seed in held.seeds])


def largest_sealed_tensor() -> int:
    """The most coordinates of any parameter tensor of the sealed test group's tasks (each
    fixed task's architecture does not depend on the seed)."""
    from learned_opt.tasks.groups import sealed_tasks

    return _largest_tensor([(family, 0) for family in sealed_tasks().values()])


def validate(
    out: Path,
    procs: int = 2,
    base: str | None = None,
    grid: tuple[float, ...] | None = None,
    recipe: str = RECIPE,
) -> float:
    """Every value of ``grid`` (default :data:`GRID`) with the weights ``base`` (default
    :data:`REPLACES`) on the wide tasks (and the validation group where it changes anything);
    writes ``out`` (its table names ``recipe``); returns the chosen value."""
    import multiprocessing

    from learned_opt.evaluate import geometric_mean
    from learned_opt.report import write_results

    base, grid = base or REPLACES, grid or GRID
    jobs = [(task, ref, seed, base) for ref in grid for task in WIDE() for seed in SEEDS]
    if procs == 1:
        records = [_wide_run(job) for job in jobs]
    else:
        with multiprocessing.get_context("spawn").Pool(procs) as pool:
            records = pool.map(_wide_run, jobs, chunksize=1)
    largest = _largest_validation_tensor()
    for ref in grid:
        if ref == 0 or ref < largest:
            records += _validation_runs(ref, base)
    cells: dict[float, dict[str, float]] = {}
    for ref in grid:
        row = cells.setdefault(ref, {})
        for h in HORIZONS:
            wide = [r["metric"][str(h)] for r in records if r["group"] == "wide"
                    and r["lr_size_ref"] == ref]  # fmt: skip
            row[f"wide {h}"] = geometric_mean(wide)
            (shipped,) = [r["metric"] for r in records if r["group"] == "validation"
                       and r["lr_size_ref"] == 0 and r["steps"] == h]  # fmt: skip
            same = [r["metric"] for r in records if r["group"] == "validation"
                    and r["lr_size_ref"] == ref and r["steps"] == h]  # fmt: skip
            row[f"validation {h}"] = same[0] if same else shipped

    def score(ref: float) -> float:
        return sum(math.log(v / cells[0.0][k]) for k, v in cells[ref].items()) / len(cells[ref])

    chosen = min(grid, key=score)
    keys = list(cells[0.0])
    lines = [
        f"`{base}` with large tensors starting at a smaller step size (`lr_size_ref`), on "
        f"wide versions of the validation group's architectures ({', '.join(WIDE())}; seeds "
        f"{list(SEEDS)}; geometric mean of the mean minibatch loss over the 10 steps before the "
        f"horizon) and on the validation group's 8 held-out tasks (final training loss; run "
        f"where the reference is below its largest tensor, {largest} coordinates, else the "
        f"same steps as `{base}`); `{recipe} --steps validate`.",
        "",
        "| lr_size_ref | " + " | ".join(keys) + f" | mean / {base} |",
        "| ---: | " + " | ".join("---:" for _ in keys) + " | ---: |",
    ]
    for ref in grid:
        mark = " (chosen)" if ref == chosen else ""
        cols = " | ".join(f"{cells[ref][k]:.4f}" for k in keys)
        lines.append(f"| {ref:g}{mark} | {cols} | {math.exp(score(ref)):.3f} |")
    lines += ["", "Per wide task (mean over seeds):", "",
              "| task | lr_size_ref | " + " | ".join(f"{h} steps" for h in HORIZONS) + " |",
              "| --- | ---: | " + " | ".join("---:" for _ in HORIZONS) + " |"]  # fmt: skip
    for task in WIDE():
        for ref in grid:
            mine = [r for r in records if r["group"] == "wide" and r["task"] == task
                    and r["lr_size_ref"] == ref]  # fmt: skip
            cols = " | ".join(f"{sum(r['metric'][str(h)] for r in mine) / len(mine):.4f}"
                              for h in HORIZONS)  # fmt: skip
            lines.append(f"| {task} | {ref:g} | {cols} |")
    write_results(out, records, lines)
    return chosen


def write_weights(path: Path) -> None:
    """``general-v2`` with ``lr_size_ref`` = :data:`CHOSEN`."""
    from learned_opt import save_rule

    path.parent.mkdir(parents=True, exist_ok=True)
    source = f"the shipped {REPLACES!r} weights with lr_size_ref={CHOSEN:g}, chosen on validation"
    save_rule(path, rule_with_reference(CHOSEN), {"source": source})


def validation_figures(
    records: Path, chosen: float | None = None, base: str | None = None, recipe: str = RECIPE
) -> dict[str, Any]:
    """The validation step's metrics of ``chosen`` (default :data:`CHOSEN`) and of the weights
    ``base`` (default :data:`REPLACES`) as shipped."""
    from learned_opt.evaluate import geometric_mean
    from learned_opt.report import read_jsonl

    rows = read_jsonl(records)
    chosen, base = CHOSEN if chosen is None else chosen, base or REPLACES

    def wide(ref: float, h: int) -> float:
        values = [
            r["metric"][str(h)] for r in rows if r["group"] == "wide" and r["lr_size_ref"] == ref
        ]
        return round(geometric_mean(values), 4)

    return {
        "command": f"{recipe} --steps validate",
        "results": str(records.parent),
        "metric": "geometric mean over the wide validation tasks and seeds of the mean minibatch "
        "loss over the 10 steps before the horizon",
        "by_steps": {str(h): {"chosen": wide(chosen, h), base: wide(0.0, h)} for h in HORIZONS},
        "selection_seconds": round(sum(r["seconds"] for r in rows), 1),
    }


def ship(dest: Path, *, sealed: Path = SEALED) -> dict[str, Any]:
    """Write the weights as ``dest/general-wide.pt`` (and ``.json``) with their provenance and
    figures, and whether their sealed geometric mean is at most the default's at each horizon
    (the condition for making them the default). Returns the metadata."""
    from learned_opt import load_rule, pretrained, save_rule
    from learned_opt.cli import git_commit

    _, meta = load_rule(pretrained.path(REPLACES))
    by_steps = {}
    largest = largest_sealed_tensor()
    for horizon in HORIZONS:
        before = candidates.sealed_figures(sealed / f"adaptation-rate-{horizon}")
        if largest <= CHOSEN:  # the same steps on every sealed task: the same figures
            mine = {**before, "same_steps_as": REPLACES, "largest_sealed_tensor": largest}
        else:
            mine = candidates.sealed_figures(sealed / f"size-scaled-step-{horizon}")
        at_most = mine["geometric_mean"] <= before["geometric_mean"]
        by_steps[str(horizon)] = {**mine, f"{REPLACES}": before, f"at_most_{REPLACES}": at_most}
    validation = validation_figures(RESULTS / "records.jsonl")
    previous = meta.pop("derived_from", None)
    meta = {key: value for key, value in meta.items() if key not in ("shipped", "figures")}
    meta.update(
        source=f"the shipped {REPLACES!r} weights with large tensors starting at a smaller step",
        derived_from={
            "weights": REPLACES,
            "settings": {"lr_size_ref": CHOSEN},
            "chosen_on_validation": validation,
            "derived_from": previous,
        },
        recipe=RECIPE,
        budget={
            **meta.get("budget", {}),
            "size_selection_seconds": validation["selection_seconds"],
        },
        figures={
            "benchmark": "benchmarks/sealed.py: mean final training loss / tuned constant "
            "Adam's per task; geometric mean over the sealed test group's tasks",
            "worst_ratio": max(entry["worst"] for entry in by_steps.values()),
            "by_steps": by_steps,
            "default_candidate": all(e[f"at_most_{REPLACES}"] for e in by_steps.values()),
        },
        shipped={"command": f"{RECIPE} --steps ship", "commit": git_commit()},
    )
    dest.mkdir(parents=True, exist_ok=True)
    save_rule(dest / f"{NAME}.pt", rule_with_reference(CHOSEN), meta)
    (dest / f"{NAME}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = candidates.settings_parser(__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2, help="processes of the validate step")
    args = parser.parse_args(argv)

    def sealed_skip() -> str | None:
        if (largest := largest_sealed_tensor()) > CHOSEN:
            return None
        return (f"no sealed tensor has more than {largest} coordinates (<= lr_size_ref "
                f"{CHOSEN:g}): the same steps as {REPLACES}, whose sealed runs stand")  # fmt: skip

    return candidates.run_settings_steps(
        args, parser, results=RESULTS, run=RUN, sealed_name="size-scaled-step", name=NAME,
        chosen=CHOSEN, validate=lambda: validate(RESULTS, args.procs),
        write_weights=write_weights, ship=ship, sealed_skip=sealed_skip,
    )  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
