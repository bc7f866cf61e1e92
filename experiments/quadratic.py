"""Recipe of the shipped ``quadratic`` weights: the paper's 10-dimensional quadratics.

    python experiments/quadratic.py               # the whole recipe (about 2 minutes on one core)
    python experiments/quadratic.py --dry-run     # print its commands, run nothing

Run it from the repository root. The steps:

1. ``meta-train``: the paper's 2x20 coordinatewise LSTM on f(theta) = ||W theta - y||^2 (10-d),
   T = 100 inner steps in truncation windows of K = 20, meta-loss = the training losses along
   each window, 4 tasks per meta-step, 150 meta-iterations; exports the best weights by
   held-out evaluation straight into the package (``learned_opt/pretrained/quadratic.pt``,
   with their metadata: command, commit, budget, figures), then adds this recipe's name to
   that metadata.
2. ``benchmark``: ``benchmarks/eval_vs_tuned.py`` on 20 fresh quadratics, 100 steps, against
   Adam, RMSprop, SGD and Nesterov with learning rates tuned on 5 other seeds (writes
   ``benchmarks/results/quadratic``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from learned_opt import load_rule, save_rule

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "python experiments/quadratic.py"
WEIGHTS = Path("learned_opt/pretrained/quadratic.pt")

META_TRAIN = [
    "meta-train", "--family", "quadratic", "--horizon", "100", "--truncation", "20",
    "--meta-lr", "3e-3", "--meta-batch", "4", "--iterations", "150", "--eval-every", "25",
    "--eval-tasks", "16", "--seed", "0", "--log-dir", "runs/quad/tb", "--ckpt-dir",
    "runs/quad/ckpt", "--resume", "--export", str(WEIGHTS), "--quiet",
]  # fmt: skip

BENCHMARK = [
    "benchmarks/eval_vs_tuned.py", "--weights", "quadratic", "--family", "quadratic",
    "--steps", "100", "--seeds", "20", "--tune-seeds", "5",
    "--baselines", "adam,rmsprop,sgd,nesterov", "--out", "benchmarks/results/quadratic",
]  # fmt: skip

STEPS = ("meta-train", "benchmark")


def add_recipe(weights: Path) -> None:
    """Name this recipe in the metadata of ``weights`` and of the ``.json`` beside them."""
    rule, meta = load_rule(weights)
    meta["recipe"] = RECIPE
    save_rule(weights, rule, meta)
    weights.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default=",".join(STEPS), help="comma list of " + ",".join(STEPS))
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if unknown := sorted(set(steps) - set(STEPS)):
        parser.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    if Path.cwd().resolve() != ROOT and not args.dry_run:
        parser.error(f"run it from the repository root ({ROOT}): its paths are relative to it")
    if "meta-train" in steps:
        print(f"# meta-train; it records itself as: learned-opt {shlex.join(META_TRAIN)}")
    for step, cmd in (("meta-train", ["-m", "learned_opt", *META_TRAIN]), ("benchmark", BENCHMARK)):
        if step in steps:
            print(shlex.join(["python", *cmd]), flush=True)
            if args.dry_run:
                continue
            threads = {"OMP_NUM_THREADS": "1"} if step == "meta-train" else {}
            subprocess.run([sys.executable, *cmd], check=True, env={**os.environ, **threads})
            if step == "meta-train":
                add_recipe(WEIGHTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
