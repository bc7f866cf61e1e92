"""Recipe of the shipped ``paper-mnist`` weights: the paper's MNIST experiment, then a fine-tune.

    python experiments/mnist_paper.py                  # the whole recipe, on CPUs
    python experiments/mnist_paper.py --dry-run        # print its commands, run nothing
    python experiments/mnist_paper.py --steps benchmark,ship      # some of its steps

Run it from the repository root; runs go under ``--out`` (``runs/mnist-paper``). The steps:

1. ``stage1``: the paper's recipe (Andrychowicz et al., 2016): the 2x20 coordinatewise LSTM
   meta-trained from a random initialization on 784-20-10 sigmoid MLPs (batch 128), T = 100
   inner steps in truncation windows of K = 20, meta-loss = the training losses along each
   window, one task per meta-step, 1,620 meta-iterations (about 40 minutes on one core). The
   weights kept are the best by held-out evaluation against tuned Adam.
2. ``stage2``: those weights fine-tuned on the held-out loss after all 100 steps, backpropagated
   through the whole unroll (K = T, first order, about 2 GB), two tasks per meta-step, for 40
   minutes. A truncated window judges an update only by the loss at the end of its own window,
   so the rule learns fast early progress and then stalls (short-horizon bias); one window over
   the whole horizon judges every update by where training ends, which is what the benchmark
   measures.
3. ``benchmark``: ``benchmarks/mnist_paper.py`` on the exported weights: the trained task, twice
   the horizon, a wider and a deeper network, and ReLU, against tuned Adam, RMSprop, SGD and
   Nesterov (writes ``benchmarks/results/mnist``).
4. ``ship``: copies the weights into ``learned_opt/pretrained/paper-mnist.pt`` with the
   benchmark's figures and this recipe in their metadata; refuses a benchmark of other weights.

TensorBoard: ``tensorboard --logdir runs/mnist-paper`` (meta-loss, meta-gradient norm, held-out
evaluation against tuned Adam, evaluation loss curves).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from learned_opt import load_rule, pretrained, save_rule

NAME = "paper-mnist"
ROOT = Path(__file__).resolve().parents[1]
RECIPE = "python experiments/mnist_paper.py"

#: Stage 1, the paper: from a random initialization, meta-loss = training losses along the unroll.
PAPER = [
    "--family", "mnist", "--horizon", "100", "--truncation", "20", "--objective", "train",
    "--meta-lr", "1e-3", "--meta-batch", "1", "--clip-grad", "1.0",
    "--eval-every", "25", "--eval-tasks", "8",
]  # fmt: skip
PAPER_RUN = ["--iterations", "1620", "--seed", "1"]

#: Stage 2: the held-out loss after all T = 100 steps, one window over the whole unroll.
FULL_HORIZON = [
    "--family", "mnist", "--horizon", "100", "--truncation", "100", "--objective", "test",
    "--meta-lr", "3e-4", "--meta-batch", "2", "--clip-grad", "1.0",
    "--eval-every", "20", "--eval-tasks", "16",
]  # fmt: skip
FULL_HORIZON_RUN = ["--iterations", "100000", "--time-budget", "2400.0", "--seed", "0"]

STEPS = ("stage1", "stage2", "benchmark", "ship")


def _outputs(run: Path) -> list[str]:
    return ["--log-dir", str(run / "tb"), "--ckpt-dir", str(run / "ckpt"), "--resume",
            "--export", str(run / f"{NAME}.pt")]  # fmt: skip


def stage_commands(out: Path) -> dict[str, list[str]]:
    """The ``learned-opt`` arguments of both meta-training stages (as the runs record them)."""
    stage1 = out / "stage1"
    return {
        "stage1": ["meta-train", *PAPER, *PAPER_RUN, *_outputs(stage1)],
        "stage2": [
            "meta-train", *FULL_HORIZON, "--init-weights", str(stage1 / f"{NAME}.pt"),
            *FULL_HORIZON_RUN, *_outputs(out / "stage2"),
        ],
    }  # fmt: skip


def ship(weights: Path, benchmark: Path, dest: Path) -> dict:
    """Write ``weights`` as ``dest/paper-mnist.pt`` (and ``.json``) with the figures of the
    ``benchmarks/mnist_paper.py`` directory ``benchmark``. Returns the metadata.

    Raises:
        ValueError: the benchmark measured other weights; nothing is written then.
    """
    bench = json.loads((benchmark / "summary.json").read_text())
    if bench.get("weights_sha256") != hashlib.sha256(weights.read_bytes()).hexdigest():
        raise ValueError(f"{benchmark} benchmarked other weights than {weights}")
    rule, meta = load_rule(weights)
    results = os.path.relpath(benchmark, ROOT) if benchmark.is_relative_to(ROOT) else benchmark
    meta["benchmark"] = {**bench, "results": str(results)}
    meta["recipe"] = RECIPE
    dest.mkdir(parents=True, exist_ok=True)
    save_rule(dest / f"{NAME}.pt", rule, meta)
    (dest / f"{NAME}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/mnist-paper"), help="run directory")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma list of " + ",".join(STEPS))
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--results-to", type=Path, default=ROOT / "benchmarks/results/mnist")
    # where ship writes: the package by default; tests ship into a temporary directory
    parser.add_argument("--ship-to", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if unknown := sorted(set(steps) - set(STEPS)):
        parser.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    commands = stage_commands(args.out)
    weights = args.out / "stage2" / f"{NAME}.pt"
    results = Path(os.path.relpath(args.results_to))

    def run(cmd: list[str]) -> None:
        print(shlex.join(["python" if a == sys.executable else a for a in cmd]), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})

    for stage in ("stage1", "stage2"):
        if stage in steps:
            print(f"# {stage}; it records itself as: learned-opt {shlex.join(commands[stage])}")
            run([sys.executable, "-m", "learned_opt", *commands[stage]])
    if "benchmark" in steps:
        script = os.path.relpath(ROOT / "benchmarks" / "mnist_paper.py")
        run([sys.executable, script, "--weights", str(weights), "--out", str(results)])
    if "ship" in steps:
        dest = args.ship_to or Path(pretrained.__file__).parent
        print(f"# ship {weights} as {NAME!r} into {os.path.relpath(dest)}")
        if not args.dry_run:
            try:
                ship(weights, results, dest)
            except ValueError as exc:
                parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
