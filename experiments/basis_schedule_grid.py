"""Fixed weights of ``ScheduledRule(basis=True)``'s three log-schedules around ``general-v7``,
scored as the meta-trainer scores a candidate (its held-out evaluation: 8 tasks, 500 steps,
told the length; geometric mean of the final training losses), beside ``general-v7`` with its
hand-designed warm-up and decay.

    python experiments/basis_schedule_grid.py \\
        --out benchmarks/results/validation/learned-basis-schedule/grid
    python experiments/basis_schedule_grid.py --family meta-train-rescaled \\
        --family-kwargs '{"label_noise": 0.2}' --out DIR   # the meta-training group's tasks

Run it from the repository root. What it is for: a meta-trainer can only find a schedule that
its tasks reward; scoring a few fixed settings of the three weights (``w_1``: the decay to the
end of a told run, ``w_2``: the warm-up, ``w_3``: the horizon-free decay, which a told run does
not use) on the validation group and on the meta-training group says whether the two agree
(``experiments/learned_basis_schedule.py`` meta-trains the same weights).
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: ``w_1, w_2, w_3`` scored by default: none, the decay alone, with a warm-up, and the weights
#: the meta-training run without a floor reached at iteration 12.
GRID = [
    (0.0, 0.0, 0.0), (0.5, 0.0, 0.0), (1.0, 0.0, 0.0), (2.0, 0.0, 0.0),
    (0.5, 0.5, 0.0), (1.0, 0.5, 0.0), (1.0, 1.0, 0.0), (0.62, -0.56, 0.54),
]  # fmt: skip
BASE = "general-v7"


def score(weights: tuple[float, ...] | None, family: str, kwargs: dict, steps: int,
          tasks: int, tails: tuple[float, ...] = (), bound: float = 3.0) -> dict:  # fmt: skip
    """The held-out metric of the basis weights (``None``: ``general-v7`` itself), with a
    late-decay log-schedule per fraction of ``tails`` after the three, the schedule's log-factor
    bounded by ``bound``."""
    import learned_basis_schedule as recipe
    import torch

    import learned_opt
    from learned_opt import load_rule
    from learned_opt.outer import MetaTrainConfig
    from learned_opt.outer.held_out import HeldOut
    from learned_opt.tasks import make_family

    torch.set_num_threads(1)
    if weights is None:
        rule = load_rule(learned_opt.pretrained.path(BASE))[0]
    else:
        rule = recipe.initial_rule(tails, bound=bound)
        with torch.no_grad():
            rule.basis.weight.copy_(torch.tensor([weights]))
    config = MetaTrainConfig(
        family="quadratic", eval_tasks=tasks, eval_horizon=steps, objective="final-train",
        log_meta_loss=True,
    )  # fmt: skip
    held_out = HeldOut(config, make_family(family, **kwargs))
    metric, _ = held_out.evaluate_rule(rule)
    weights = None if weights is None else list(weights)
    return {"weights": weights, "tails": list(tails), "bound": bound, "metric": metric}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--family", default="validation")
    parser.add_argument("--family-kwargs", type=json.loads, default={})
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--grid", type=json.loads, default=None,
                        help="a JSON list of [w1, w2, w3] (default: GRID)")  # fmt: skip
    parser.add_argument("--tails", type=json.loads, default=[],
                        help="a JSON list of fractions c: one late-decay log-schedule each, "
                        "weighted by the entries after the third of each grid point")  # fmt: skip
    parser.add_argument("--bound", type=float, default=3.0,
                        help="the schedule's bound A (its factor in [e^-A, e^A])")  # fmt: skip
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from learned_opt.report import write_results

    grid = [None, *[tuple(w) for w in (args.grid or GRID)]]
    tails = tuple(float(c) for c in args.tails)
    if any(len(w) != 3 + len(tails) for w in grid[1:]):
        parser.error(f"each grid point needs {3 + len(tails)} weights (3 and one per tail)")
    what = (args.family, args.family_kwargs, args.steps, args.tasks, tails, args.bound)
    if args.procs > 1:
        with ProcessPoolExecutor(args.procs) as pool:
            records = [f.result() for f in [pool.submit(score, w, *what) for w in grid]]
    else:
        records = [score(w, *what) for w in grid]
    family = args.family + (f" {json.dumps(args.family_kwargs)}" if args.family_kwargs else "")
    lines = [
        f"Basis weights around `{BASE}` on {args.tasks} held-out tasks of `{family}` "
        f"({args.steps} steps, told the length; the meta-trainer's evaluation; the learned "
        f"log-factor bounded at {args.bound:g}): geometric mean of the final training losses "
        "(lower: better).",
        "",
        "| w_1 (decay, told) | w_2 (warm-up) | w_3 (decay, not told) | "
        + "".join(f"w (decay over the last {c:g} T) | " for c in tails)
        + "metric |",
        "| ---: | ---: | ---: | " + "---: | " * len(tails) + "---: |",
    ]
    for r in records:
        w = r["weights"]
        blank = [f"`{BASE}` (hand-designed)"] + [""] * (2 + len(tails))
        cells = blank if w is None else [f"{x:g}" for x in w]
        lines.append("| " + " | ".join(cells) + f" | {r['metric']:.4f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(args.out, records, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
