"""Benchmark: the smallest difference the meta-trainer's held-out metric can resolve.

Candidates are chosen by the meta-trainer's held-out metric (the geometric mean of the final
training losses of ``--eval-tasks`` tasks of the validation group, each run once at a fixed
seed). A change of the rule that cannot matter to a user, such as its learning-rate multiplier
moved by 1%, still changes every run's trajectory, and on tasks whose final loss depends on the
path (minibatch noise, label noise) it moves the final losses as a new seed would. This script
measures that: the shipped weights at multipliers ``--scales`` around 1 on the first ``N`` of
``--tasks`` held-out tasks (the meta-trainer's evaluation seeds and horizon, told the length),
and for each ``N`` of ``--subsets`` the spread of the metric over the multipliers (largest over
smallest, minus 1). A difference between two candidates smaller than that spread is not
evidence that one is better.

    python benchmarks/selection_noise.py --out benchmarks/results/selection_noise/validation
    python benchmarks/selection_noise.py --family meta-train-rescaled \\
        --family-kwargs '{"label_noise": 0.2}' --out benchmarks/results/selection_noise/meta-train

Writes ``records.jsonl`` (one final loss per multiplier and task) and ``table.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def final_loss(weights: str, family: str, kwargs: dict, seed: int, scale: float,
               steps: int) -> float:  # fmt: skip
    """The final training loss of one held-out task (``seed``) trained by the learned
    optimizer at multiplier ``scale``, told the run's length when the rule reads it."""
    import torch

    from learned_opt import load_rule
    from learned_opt.evaluate import run_optimizer
    from learned_opt.optim import LearnedOptimizer
    from learned_opt.pretrained import resolve
    from learned_opt.tasks import make_family

    torch.set_num_threads(1)
    rule, _ = load_rule(resolve(weights))
    told = {"total_steps": steps} if getattr(rule, "reads_horizon", False) else {}

    def factory(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
        return LearnedOptimizer(params, rule, lr=lr, **told)

    run = run_optimizer(make_family(family, **kwargs), seed, factory, scale, steps)
    return float(run.final_train_loss)


def spread(values: list[float]) -> float:
    """Largest over smallest, minus 1 (``inf`` if any is not finite)."""
    if not all(math.isfinite(v) and v > 0 for v in values):
        return math.inf
    return max(values) / min(values) - 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--weights", default=None, help="shipped name or file (default: default)")
    parser.add_argument("--family", default="validation")
    parser.add_argument("--family-kwargs", type=json.loads, default={})
    parser.add_argument("--steps", type=int, default=500, help="the meta-trainer's eval horizon")
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--subsets", default="8,16,32", help="comma list of task counts N")
    parser.add_argument("--scales", default="0.98,0.99,1,1.01,1.02")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from learned_opt import pretrained
    from learned_opt.evaluate import geometric_mean
    from learned_opt.outer import MetaTrainConfig
    from learned_opt.outer.held_out import HeldOut
    from learned_opt.report import write_results
    from learned_opt.tasks import make_family

    weights = args.weights or pretrained.DEFAULT
    scales = [float(s) for s in args.scales.split(",")]
    subsets = [int(n) for n in args.subsets.split(",")]
    if not scales or min(scales) <= 0 or max(subsets) > args.tasks or min(subsets) < 1:
        parser.error("need scales > 0 and 1 <= N <= --tasks for every N of --subsets")
    config = MetaTrainConfig(family="quadratic", eval_tasks=args.tasks, eval_horizon=args.steps)
    seeds = HeldOut(config, make_family(args.family, **args.family_kwargs)).seeds
    jobs = [(s, seed) for s in scales for seed in seeds]
    what = (weights, args.family, args.family_kwargs)
    start = time.perf_counter()
    with ProcessPoolExecutor(args.procs) as pool:
        futures = [pool.submit(final_loss, *what, seed, s, args.steps) for s, seed in jobs]
        losses = [f.result() for f in futures]
    seconds = time.perf_counter() - start
    records = [
        {"weights": weights, "family": args.family, "family_kwargs": args.family_kwargs,
         "steps": args.steps, "scale": s, "task": k % args.tasks, "seed": seed,
         "final_train_loss": loss}
        for k, ((s, seed), loss) in enumerate(zip(jobs, losses, strict=True))
    ]  # fmt: skip
    by_scale = {s: losses[i * args.tasks : (i + 1) * args.tasks] for i, s in enumerate(scales)}
    family = args.family + (f" {json.dumps(args.family_kwargs)}" if args.family_kwargs else "")
    lines = [
        f"`{weights}` at learning-rate multipliers {args.scales} on the first N held-out tasks "
        f"of `{family}` (the meta-trainer's evaluation seeds, {args.steps} steps, told the "
        "length): the metric (geometric mean of the final training losses) per multiplier, and "
        "its spread over the multipliers (largest / smallest - 1); per task, the median of the "
        f"tasks' own spreads. {seconds / 60:.1f} min on {args.procs} processes.",
        "",
        "| N tasks | " + " | ".join(f"x{s:g}" for s in scales) + " | spread | task median |",
        "| ---: | " + "---: | " * len(scales) + "---: | ---: |",
    ]
    task_spreads = [spread([by_scale[s][k] for s in scales]) for k in range(args.tasks)]
    for n in subsets:
        metrics = [geometric_mean(by_scale[s][:n]) for s in scales]
        median = sorted(task_spreads[:n])[n // 2]
        lines.append(
            f"| {n} | " + " | ".join(f"{m:.4f}" for m in metrics)
            + f" | {spread(metrics):.1%} | {median:.1%} |"
        )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(args.out, records, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
