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
import contextlib
import io
import platform
import sys
from pathlib import Path

import torch

from learned_opt.cli import git_commit, main
from learned_opt.report import read_jsonl, table


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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cli = [
        "eval",
        "--weights",
        args.weights,
        "--family",
        args.family,
        "--steps",
        str(args.steps),
        "--seeds",
        str(args.seeds),
        "--tune-seeds",
        str(args.tune_seeds),
        "--baselines",
        args.baselines,
        "--records",
        str(out / "records.jsonl"),
        "--plot",
        str(out / "curves.png"),
    ]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(cli)
    sys.stdout.write(buf.getvalue())
    if code:
        return code
    records = read_jsonl(out / "records.jsonl")
    reference = args.baselines.split(",")[0]
    header = (
        f"# {args.weights} on {args.family}, {args.steps} steps, {args.seeds} evaluation seeds\n\n"
        f"Command: `python benchmarks/eval_vs_tuned.py {' '.join(argv or sys.argv[1:])}`  \n"
        f"Commit: {git_commit()}; torch {torch.__version__}; {platform.machine()}"
        f", {torch.get_num_threads()} threads\n\n"
    )
    (out / "table.md").write_text(
        header
        + "Final loss on the whole training set:\n\n"
        + table(records, reference)
        + "\n\n"
        + "Final loss on held-out data:\n\n"
        + table(records, reference, metric="final_test_loss")
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
