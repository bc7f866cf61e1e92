"""Weights files on ``val-ood`` tasks against Adam tuned on each task itself, at several horizons.

The check of ``experiments/select_adapt_valood.py`` for trained weights instead of a grid of
untrained configurations: the same ``val-ood`` task seeds (validation tasks outside both the
meta-training distribution and ``benchmarks/ood.py``), Adam's learning rate the best of the grid
on each task and horizon itself (a stricter baseline than the benchmark's, which tunes on other
seeds), and per task the ratio of final training losses. Prints a table (ratios, then the
geometric mean, the worst task and the tasks won per weights) and writes ``results.json``.

    python experiments/valood_weights.py --weights trained=run/weights.pt,untrained=stable.pt \
        --steps 100,1000 --tasks 8 --out experiments/results/general/valood-trained
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ood import geometric_mean, load_learned, parse_weights  # noqa: E402
from experiments.select_adapt_valood import _STREAM  # noqa: E402  (the same val-ood task seeds)
from learned_opt.cli import git_commit  # noqa: E402
from learned_opt.evaluate import DEFAULT_LR_GRID, run_optimizer, task_seed  # noqa: E402
from learned_opt.optim import LearnedOptimizer  # noqa: E402
from learned_opt.tasks import make_family  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="comma list of [label=]name or file")
    parser.add_argument("--steps", default="100,1000", help="comma list of horizons")
    parser.add_argument("--tasks", type=int, default=8, help="val-ood tasks")
    parser.add_argument("--lrs", default=",".join(map(str, DEFAULT_LR_GRID)))
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        weights = parse_weights(args.weights)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    rules = {label: load_learned(path) for label, path in weights.items()}
    commit = git_commit()
    family = make_family("val-ood")
    seeds = [task_seed(0, _STREAM, k) for k in range(args.tasks)]
    lrs = [float(x) for x in args.lrs.split(",")]
    rows = []
    start = time.perf_counter()
    for n in (int(s) for s in args.steps.split(",")):
        for k, s in enumerate(seeds):
            adam = min(
                (run_optimizer(family, s, lambda p, lr: torch.optim.Adam(p, lr=lr), lr, n)
                 for lr in lrs),
                key=lambda r: r.final_train_loss if math.isfinite(r.final_train_loss) else math.inf,
            )
            row = {"task": f"{k}:{adam.task}", "steps": n, "adam_lr": adam.lr,
                   "adam": adam.final_train_loss, "ratio": {}}
            for label, rule in rules.items():
                r = run_optimizer(family, s, lambda p, _, rule=rule: LearnedOptimizer(p, rule),
                                  1.0, n, name=label)
                loss = r.final_train_loss if math.isfinite(r.final_train_loss) else math.inf
                row["ratio"][label] = loss / adam.final_train_loss
            rows.append(row)
            cells = ", ".join(f"{k} {v:.3g}" for k, v in row["ratio"].items())
            print(f"{row['task']}@{n}: Adam {adam.final_train_loss:.4g} (lr {adam.lr:g}); "
                  f"{cells}; {time.perf_counter() - start:.0f}s", flush=True)
    labels = list(rules)
    lines = ["| task | steps | Adam lr | Adam final loss | " + " | ".join(labels) + " |",
             "| --- | ---: | ---: | ---: |" + " ---: |" * len(labels)]
    for r in rows:
        cells = " | ".join(f"{r['ratio'][k]:.3g}" for k in labels)
        head = f"| {r['task']} | {r['steps']} | {r['adam_lr']:g} | {r['adam']:.4g} |"
        lines.append(f"{head} {cells} |")
    for n in sorted({r["steps"] for r in rows}):
        sub = [r for r in rows if r["steps"] == n]
        for name, fn in (("geometric mean", geometric_mean), ("worst task", max)):
            cells = " | ".join(f"{fn([r['ratio'][k] for r in sub]):.3g}" for k in labels)
            lines.append(f"| **{name}** | {n} | | | {cells} |")
        cells = " | ".join(f"{sum(r['ratio'][k] < 1 for r in sub)}/{len(sub)}" for k in labels)
        lines.append(f"| **tasks won** | {n} | | | {cells} |")
    table = "\n".join(lines)
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/valood_weights.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    (args.out / "results.json").write_text(json.dumps(
        {"command": command, "commit": commit, "weights": weights, "rows": rows}, indent=2) + "\n")
    (args.out / "table.md").write_text(
        f"# val-ood: weights vs Adam tuned per task\n\nCommand: `{command}`  \nCommit: {commit}\n\n"
        f"{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
