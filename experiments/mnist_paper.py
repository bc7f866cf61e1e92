"""Reproduce the paper's MNIST experiment: meta-train the 2x20 coordinatewise LSTM on 784-20-10
sigmoid MLPs (batch 128, T = 100, K = 20), select weights by held-out evaluation, and export them.

The recipe of the shipped ``paper-mnist`` weights (one core each; ~40 + ~45 minutes):

    python experiments/mnist_paper.py --out runs/mnist-s1 --seed 1 --iterations 1620      # stage 1
    python experiments/mnist_paper.py --out runs/mnist-s3 --stage 3 --time-budget 2400 \
        --finetune-from runs/mnist-s1/paper-mnist.pt                                      # stage 3
    python benchmarks/mnist_paper.py --weights runs/mnist-s3/paper-mnist.pt \
        --out benchmarks/results/mnist
    python experiments/mnist_paper.py --out runs/mnist-s3 --ship \
        --benchmark benchmarks/results/mnist

Other entry points:

    python experiments/mnist_paper.py --out runs/mnist-paper --time-budget 3600 --resume   # go on
    python experiments/mnist_paper.py --out runs/mnist-ft --finetune-from paper-mnist  # stage 2
    python experiments/mnist_paper.py --out runs/mnist-s4 --finetune-from paper-mnist --stage 4
    python experiments/mnist_paper.py --out runs/mnist-s5 --finetune-from paper-mnist --stage 5
    python experiments/mnist_paper.py --out runs/mnist-paper --ship    # copy into the package

TensorBoard: ``tensorboard --logdir runs/mnist-paper/tb`` (meta-loss, meta-gradient norm, the
held-out evaluation over meta-training against tuned Adam, evaluation loss curves).
Then benchmark: ``python benchmarks/mnist_paper.py --weights runs/mnist-paper/paper-mnist.pt``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

from learned_opt import pretrained
from learned_opt.checkpoint import load_rule, save_rule
from learned_opt.cli import main

#: The shipped name of the weights this recipe produces.
NAME = "paper-mnist"

#: Stage 1, the paper: from a random initialization, meta-loss = training losses along the unroll.
RECIPE = [
    "--family", "mnist", "--horizon", "100", "--truncation", "20", "--objective", "train",
    "--meta-lr", "1e-3", "--meta-batch", "1", "--clip-grad", "1.0",
    "--eval-every", "25", "--eval-tasks", "8",
]  # fmt: skip


#: Stage 2: fine-tune stage 1's best weights on the held-out loss at the end of each truncation
#: window, which weighs where the inner training ends rather than how fast it starts.
FINETUNE = [
    "--family", "mnist", "--horizon", "100", "--truncation", "20", "--objective", "test",
    "--meta-lr", "3e-4", "--meta-batch", "2", "--clip-grad", "1.0",
    "--eval-every", "25", "--eval-tasks", "16",
]  # fmt: skip


#: Stage 3: fine-tune on the held-out loss after all T = 100 steps, backpropagated through the
#: whole unroll (K = T; first order, so memory is about 2 GB). Truncated windows judge early
#: updates only by the loss at the end of their own window (short-horizon bias: the learned rule
#: learns to make fast early progress and then stall); one window judges them by where training
#: ends, which is what the benchmark measures.
FULL = [
    "--family", "mnist", "--horizon", "100", "--truncation", "100", "--objective", "test",
    "--meta-lr", "3e-4", "--meta-batch", "2", "--clip-grad", "1.0",
    "--eval-every", "20", "--eval-tasks", "16",
]  # fmt: skip

#: Stage 4: stage 3 continued with a less noisy meta-gradient (8 tasks per meta-step, meta-lr
#: 1e-4) and a finer weight selection (32 held-out tasks, every 10 meta-steps): stage 3's held-out
#: metric peaked at its meta-step 120 of 301 and then wandered.
FULL_LOW_NOISE = [
    "--family", "mnist", "--horizon", "100", "--truncation", "100", "--objective", "test",
    "--meta-lr", "1e-4", "--meta-batch", "8", "--clip-grad", "1.0",
    "--eval-every", "10", "--eval-tasks", "32",
]  # fmt: skip

#: Stage 5: stage 3 with the second-order meta-gradient (backpropagating through the optimizee's
#: gradients, ``create_graph=True``). The paper drops those terms; then the meta-gradient cannot
#: see that a larger update changes the gradients the rule reads next, and in few-shot learning
#: the same LSTM rule gained 8 points of accuracy from the second-order meta-gradient. Here it
#: did not help: from the shipped weights, 213 meta-steps never beat the starting held-out ratio
#: to tuned Adam (0.913; it went up to 0.959 and back to 0.918).
FULL_SECOND_ORDER = [
    "--family", "mnist", "--horizon", "100", "--truncation", "100", "--objective", "test",
    "--second-order", "--meta-lr", "1e-4", "--meta-batch", "2", "--clip-grad", "1.0",
    "--eval-every", "10", "--eval-tasks", "32",
]  # fmt: skip

STAGES = {1: RECIPE, 2: FINETUNE, 3: FULL, 4: FULL_LOW_NOISE, 5: FULL_SECOND_ORDER}


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/mnist-paper")
    parser.add_argument("--time-budget", type=float, default=3600.0, help="seconds")
    parser.add_argument("--iterations", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--finetune-from", default=None, help="start from these weights")
    parser.add_argument(
        "--stage",
        type=int,
        choices=sorted(STAGES),
        default=None,
        help="recipe stage (default: 1, or 2 with --finetune-from)",
    )
    parser.add_argument(
        "--ship",
        action="store_true",
        help="copy the exported weights into "
        f"learned_opt/pretrained/{NAME}.pt and stop",
    )
    parser.add_argument(
        "--benchmark",
        default=None,
        help="with --ship: an output directory of benchmarks/mnist_paper.py run on these "
        "weights; its figures and command go into the shipped metadata",
    )
    # where --ship writes: the package by default; tests ship into a temporary directory
    parser.add_argument("--ship-to", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    weights = out / f"{NAME}.pt"
    if args.ship:
        dest = Path(args.ship_to or Path(pretrained.__file__).parent)
        if args.benchmark is None:
            shutil.copyfile(weights, dest / weights.name)
            shutil.copyfile(weights.with_suffix(".json"), dest / f"{NAME}.json")
        else:
            bench = json.loads((Path(args.benchmark) / "summary.json").read_text())
            digest = hashlib.sha256(weights.read_bytes()).hexdigest()
            if bench.get("weights_sha256") != digest:
                parser.error(f"{args.benchmark} benchmarked other weights than {weights}")
            rule, meta = load_rule(weights)
            meta["benchmark"] = {**bench, "results": str(args.benchmark)}
            save_rule(dest / weights.name, rule, meta)
            (dest / f"{NAME}.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"shipped {weights} as {NAME} in {dest}")
        return 0
    stage = args.stage or (1 if args.finetune_from is None else 2)
    if stage > 1 and args.finetune_from is None:
        parser.error(f"stage {stage} fine-tunes: give --finetune-from")
    recipe = STAGES[stage]
    if args.finetune_from is not None:
        recipe = [*recipe, "--init-weights", args.finetune_from]
    cli = [
        "meta-train",
        *recipe,
        "--iterations",
        str(args.iterations),
        "--time-budget",
        str(args.time_budget),
        "--seed",
        str(args.seed),
        "--log-dir",
        str(out / "tb"),
        "--ckpt-dir",
        str(out / "ckpt"),
        "--export",
        str(weights),
    ]
    if args.resume:
        cli.append("--resume")
    return main(cli)


if __name__ == "__main__":
    sys.exit(run())
