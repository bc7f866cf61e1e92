"""Benchmark: the paper's MNIST figures (Andrychowicz et al. 2016, Figures 4 and 5).

The LSTM optimizer against Adam, RMSprop, SGD and Nesterov momentum, each tuned on a learning-rate
grid on 5 tuning seeds separate from the 20 evaluation seeds, on:
the training task (784-20-10 sigmoid MLP, 100 steps), twice the horizon (200 steps), 40 hidden
units, two hidden layers, and ReLU. Writes per-setting records/tables/plots and ``summary.md``.

    python benchmarks/mnist_paper.py --weights paper-mnist --out benchmarks/results/mnist
    python benchmarks/mnist_paper.py --smoke --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from learned_opt import pretrained
from learned_opt.cli import eval_report
from learned_opt.report import read_jsonl

SETTINGS = [  # (name, family, steps)
    ("train-task-100", "mnist", 100),
    ("horizon-200", "mnist", 200),
    ("hidden-40", "mnist-40", 100),
    ("two-layers", "mnist-2layer", 100),
    ("relu", "mnist-relu", 100),
]


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="paper-mnist")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--tune-seeds", type=int, default=5)
    parser.add_argument("--only", default=None, help="comma list of setting names")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    settings = SETTINGS
    if args.only:
        settings = [s for s in SETTINGS if s[0] in args.only.split(",")]
    if args.smoke:
        settings = [("smoke", "digits", 10)]
        args.weights, args.seeds, args.tune_seeds = "quadratic", 2, 1
    out = Path(args.out)
    lines = [
        f"# {args.weights}: the paper's MNIST settings\n",
        f"{args.seeds} evaluation seeds; learning rates tuned on {args.tune_seeds} other "
        "seeds. Mean final loss on the whole training set (60k), ratio to the best tuned "
        "hand-designed optimizer and to tuned Adam.\n",
        "| setting | steps | LSTM | best hand-designed | its mean | LSTM / best | Adam "
        "| LSTM / Adam |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    weights_file = pretrained.resolve(args.weights)
    summary = {
        "command": shlex.join(["python", "benchmarks/mnist_paper.py", *(argv or sys.argv[1:])]),
        "weights": str(args.weights),
        "weights_sha256": hashlib.sha256(weights_file.read_bytes()).hexdigest(),
        "metric": f"mean final loss on the whole 60k MNIST training set, {args.seeds} evaluation "
        f"seeds, baselines' learning rates tuned on {args.tune_seeds} other seeds",
        "figures": {},
    }
    for name, family, steps in settings:
        eval_args = ["--weights", args.weights, "--family", family, "--steps", str(steps)]
        eval_args += ["--seeds", str(args.seeds), "--tune-seeds", str(args.tune_seeds)]
        eval_args += ["--baselines", "adam,rmsprop,sgd,nesterov"]
        title = f"{args.weights} on {family}, {steps} steps, {args.seeds} evaluation seeds"
        code = eval_report(out / name, eval_args, title, summary["command"])
        if code:
            return code
        means: dict[str, float] = {}
        for r in read_jsonl(out / name / "records.jsonl"):
            means.setdefault(r["optimizer"], []).append(r["final_train_loss"])  # type: ignore[attr-defined]
        means = {k: float(np.mean(v)) for k, v in means.items()}
        learned = next(v for k, v in means.items() if k.startswith("learned:"))
        hand = {k: v for k, v in means.items() if not k.startswith("learned:")}
        best = min(hand, key=hand.get)
        lines.append(
            f"| {name} | {steps} | {learned:.4f} | {best} | {hand[best]:.4f} | "
            f"{learned / hand[best]:.3f} | {hand['adam']:.4f} | {learned / hand['adam']:.3f} |"
        )
        summary["figures"][name] = {
            "steps": steps,
            "lstm": round(learned, 4),
            "adam_tuned": round(hand["adam"], 4),
            "ratio_vs_adam": round(learned / hand["adam"], 3),
            "best_hand": f"{best} {hand[best]:.4f}",
            "ratio_vs_best_hand": round(learned / hand[best], 3),
        }
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
