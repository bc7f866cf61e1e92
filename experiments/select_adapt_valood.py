"""Choose the step-size adaptation's base learning rate and rate on ``val-ood``, not the test tasks.

The general rule with ``lr_adapt`` and a zero read-out is Adam with per-tensor hypergradient step
sizes; its two numbers (base ``lr`` and ``kappa``) matter most at 100 steps. This script runs a
grid of them on tasks of the ``val-ood`` family (validation tasks outside both the meta-training
distribution and ``benchmarks/ood.py``), at several horizons, against Adam with its learning rate
tuned per task and horizon, and ranks the grid by the worst per-task ratio of final training
losses (then by their geometric mean). At a zero read-out the LSTM's size does not change the
update, so the grid runs a 1-unit LSTM (same updates, much faster).

    python experiments/select_adapt_valood.py --out experiments/results/general/select-adapt
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from learned_opt.evaluate import DEFAULT_LR_GRID, run_optimizer, task_seed
from learned_opt.optim import LearnedOptimizer
from learned_opt.rules import GeneralLSTMRule
from learned_opt.tasks import make_family

_STREAM = 3_000_017  # task seeds of this selection (disjoint from the benchmark's streams)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", default="0.01,0.015,0.02")
    parser.add_argument("--kappas", default="0.05,0.1,0.15")
    parser.add_argument("--steps", default="100,1000")
    parser.add_argument("--tasks", type=int, default=8, help="val-ood tasks")
    parser.add_argument("--rule-kwargs", default="{}", type=json.loads,
                        help="other GeneralLSTMRule options for every grid point (JSON), e.g. the "
                             "stabilizers of experiments/stable_adapt.py")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    family = make_family("val-ood")
    seeds = [task_seed(0, _STREAM, k) for k in range(args.tasks)]
    horizons = [int(s) for s in args.steps.split(",")]
    grid = [(float(a), float(k)) for a in args.lrs.split(",") for k in args.kappas.split(",")]
    mine: dict[tuple[float, float], list[float]] = {g: [] for g in grid}
    names: list[str] = []
    start = time.perf_counter()
    for n in horizons:
        for k, s in enumerate(seeds):
            best = min(
                run_optimizer(family, s, lambda p, lr: torch.optim.Adam(p, lr=lr), lr, n)
                .final_train_loss
                for lr in DEFAULT_LR_GRID
            )
            for lr, kappa in grid:
                rule = GeneralLSTMRule(hidden_size=1, **{**args.rule_kwargs, "lr": lr,
                                                          "lr_adapt": kappa})
                factory = lambda p, _, rule=rule: LearnedOptimizer(p, rule)  # noqa: E731
                r = run_optimizer(family, s, factory, 1.0, n)
                loss = r.final_train_loss if math.isfinite(r.final_train_loss) else math.inf
                mine[(lr, kappa)].append(loss / best)
            names.append(f"{k}:{r.task}@{n}")  # task k of the family (names repeat)
            print(f"{names[-1]}: Adam {best:.4g}; {time.perf_counter() - start:.0f}s", flush=True)
    rows = []
    for (lr, kappa), ratios in mine.items():
        finite = all(math.isfinite(x) and x > 0 for x in ratios)
        gmean = math.exp(sum(math.log(x) for x in ratios) / len(ratios)) if finite else math.inf
        rows.append({"lr": lr, "kappa": kappa, "worst": max(ratios), "gmean": gmean,
                     "ratios": dict(zip(names, ratios))})
    rows.sort(key=lambda r: (r["worst"], r["gmean"]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grid.json").write_text(json.dumps(
        {"command": "python experiments/select_adapt_valood.py " + " ".join(sys.argv[1:]),
         "rule_kwargs": args.rule_kwargs, "rows": rows}, indent=2) + "\n")
    print("\n| lr | kappa | worst ratio | geometric mean |\n| ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['lr']:g} | {r['kappa']:g} | {r['worst']:.3f} | {r['gmean']:.3f} |")
    print(f"selected: lr={rows[0]['lr']:g}, kappa={rows[0]['kappa']:g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
