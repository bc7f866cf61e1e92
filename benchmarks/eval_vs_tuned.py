"""Benchmark: a learned optimizer against hand-designed optimizers with tuned learning rates.

Each hand-designed optimizer's learning rate is tuned on a grid on tuning seeds that are disjoint
from the evaluation seeds; the learned optimizer runs as shipped (multiplier 1.0). Writes
``records.jsonl`` (one line per run: optimizer, lr, seed, per-step losses, final losses, wall
time), ``table.md`` (generated from the records) and ``curves.png`` into ``--out``.

    python benchmarks/eval_vs_tuned.py --weights quadratic --family quadratic \
        --out benchmarks/results/quadratic
    python benchmarks/eval_vs_tuned.py --smoke --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import sys

from learned_opt.cli import eval_report


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="paper-mnist")
    parser.add_argument("--family", default="mnist")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--tune-seeds", type=int, default=5)
    parser.add_argument("--baselines", default="adam,rmsprop,sgd,nesterov")
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="a tiny run (seconds), for tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.weights, args.family, args.steps, args.seeds, args.tune_seeds = (
            "quadratic",
            "quadratic",
            10,
            2,
            1,
        )
    eval_args = ["--weights", args.weights, "--family", args.family, "--steps", str(args.steps)]
    eval_args += ["--seeds", str(args.seeds), "--tune-seeds", str(args.tune_seeds)]
    eval_args += ["--baselines", args.baselines]
    title = f"{args.weights} on {args.family}, {args.steps} steps, {args.seeds} evaluation seeds"
    command = f"python benchmarks/eval_vs_tuned.py {' '.join(argv or sys.argv[1:])}"
    return eval_report(args.out, eval_args, title, command)


if __name__ == "__main__":
    raise SystemExit(run())
