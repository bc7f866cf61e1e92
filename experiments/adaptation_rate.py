"""Recipe of the shipped default with its step-size adaptation retuned on the validation group (a
default candidate).

    python experiments/adaptation_rate.py                    # validate, weights, sealed test
    python experiments/adaptation_rate.py --steps validate   # the choice alone
    python experiments/adaptation_rate.py --dry-run          # print its commands, run nothing

Run it from the repository root. The rule is the shipped default (the LSTM-corrected Adam rule,
its LSTM and read-out as shipped) with other settings of its hand-designed per-tensor step-size
adaptation, chosen on the validation group. The shipped settings adapt at a rate of 0.1 per step
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
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import candidates  # noqa: E402

RUN = Path("runs/adaptation-rate")
RESULTS = Path("benchmarks/results/validation/adaptation-rate")
STEPS = ("validate", "weights", "sealed")
HORIZONS = (100, 1000)

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
    import torch

    from learned_opt import LearnedOptimizer, load_rule, pretrained
    from learned_opt.evaluate import run_optimizer
    from learned_opt.outer.config import MetaTrainConfig
    from learned_opt.outer.held_out import HeldOut
    from learned_opt.report import write_results
    from learned_opt.tasks import make_family

    torch.set_num_threads(1)
    base, _ = load_rule(pretrained.path("general"))
    records = []
    for horizon in HORIZONS:
        config = MetaTrainConfig(
            objective="final-train", log_meta_loss=True, eval_family="validation",
            eval_tasks=8, eval_horizon=horizon,
        )  # fmt: skip
        held = HeldOut(config, make_family("validation"))
        for changes in GRID:
            rule = base.variant(**changes) if changes else base
            start = time.perf_counter()

            def factory(params, lr, rule=rule):
                return LearnedOptimizer(params, rule, lr=lr)

            runs = [run_optimizer(held.family, s, factory, 1.0, horizon) for s in held.seeds]
            losses = [getattr(r, held.metric_name) for r in runs]
            records.append({"setting": changes, "steps": horizon, "losses": losses,
                            "metric": held.aggregate(losses),
                            "seconds": time.perf_counter() - start})  # fmt: skip
            print(f"{horizon} steps {json.dumps(changes)}: {records[-1]['metric']:.4f}", flush=True)
    metric = {(json.dumps(r["setting"]), r["steps"]): r["metric"] for r in records}

    def score(changes: dict[str, float]) -> float:
        key = json.dumps(changes)
        return sum(math.log(metric[key, h] / metric["{}", h]) for h in HORIZONS) / len(HORIZONS)

    chosen = min(GRID, key=score)
    lines = [
        "The shipped default with other settings of its step-size adaptation, on the validation "
        "group's 8 held-out tasks (the meta-trainer's evaluation seeds); metric: geometric mean "
        "of the final training loss; `python experiments/adaptation_rate.py --steps validate`.",
        "",
        "| setting | " + " | ".join(f"{h} steps" for h in HORIZONS) + " | mean / shipped |",
        "| --- | " + " | ".join("---:" for _ in HORIZONS) + " | ---: |",
    ]
    for changes in GRID:
        key = json.dumps(changes)
        cells = " | ".join(f"{metric[key, h]:.4f}" for h in HORIZONS)
        mark = " (chosen)" if changes == chosen else ""
        lines.append(f"| `{key}`{mark} | {cells} | {math.exp(score(changes)):.3f} |")
    write_results(out, records, lines)
    return chosen


def write_weights(path: Path) -> None:
    """The shipped weights with :data:`CHOSEN`."""
    from learned_opt import load_rule, pretrained, save_rule

    base, _ = load_rule(pretrained.path("general"))
    path.parent.mkdir(parents=True, exist_ok=True)
    source = f"the shipped 'general' weights with {json.dumps(CHOSEN)}, chosen on validation"
    save_rule(path, base.variant(**CHOSEN), {"source": source})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default=",".join(STEPS), help="comma list of " + ",".join(STEPS))
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if unknown := sorted(set(steps) - set(STEPS)):
        parser.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    if Path.cwd().resolve() != candidates.ROOT and not args.dry_run:
        parser.error(f"run it from the repository root ({candidates.ROOT})")
    if "validate" in steps:
        print(f"# validate: {RESULTS}", flush=True)
        if not args.dry_run and (chosen := validate(RESULTS)) != CHOSEN:
            print(f"# the validation now chooses {chosen}, not CHOSEN {CHOSEN}", flush=True)
    if "weights" in steps:
        print(f"# weights: {RUN / 'weights.pt'}", flush=True)
        if not args.dry_run:
            write_weights(RUN / "weights.pt")
    if "sealed" in steps:
        sealed = candidates.sealed_command(RUN, "adaptation-rate")
        for horizon in HORIZONS:
            command = sealed(horizon)
            print(shlex.join(["python", *command]), flush=True)
            if not args.dry_run:
                subprocess.run([sys.executable, *command], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
