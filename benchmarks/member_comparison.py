"""Benchmark: where two or more learned rules differ, member by member of a task group.

A meta-training run's held-out metric is one geometric mean over a few tasks; two weights that
score alike there can trade one kind of task for another, and meta-training can drift towards
the members whose final loss is most sensitive to the rule. This script runs each rule on
``--seeds`` tasks of every member of a mixture family (``meta-train``, ``validation``, or a
registered variant with ``--family-kwargs``), the same tasks for every rule, told the run's
length when a rule reads it (``--untold``: never), and reports per member the geometric mean of
the final training losses of the first rule and each other's ratio to it, with the geometric
mean of those ratios over the members (each member counted once, whatever its weight in the
mixture).

    python benchmarks/member_comparison.py --weights general-v7 \\
        --weights runs/learned-adaptation/ckpt/ckpt_00000062.pt@latest \\
        --family meta-train-rescaled --family-kwargs '{"label_noise": 0.2}' --out DIR

A rule is a shipped name, a weights file, or a meta-trainer checkpoint (its best weights;
``PATH@latest``: its latest). Writes ``records.jsonl`` (one final loss per rule, member and
seed) and ``table.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

#: Seeds of this benchmark's tasks (disjoint from the meta-trainer's and the sealed test's).
MEMBER_STREAM = 5_000_011


def load(spec: str):
    """The rule of ``spec``: a shipped name, a weights file, or ``checkpoint[@latest]``."""
    from learned_opt import load_rule
    from learned_opt.pretrained import resolve

    path, _, which = spec.partition("@")
    rule, _ = load_rule(resolve(path), which=which or "best")
    return rule


def final_loss(
    spec: str, family: str, kwargs: dict, member: int, seed: int, steps: int, told: bool = True
) -> float:
    """The final training loss of one task (``seed``) of member ``member`` of ``family``
    trained by the rule of ``spec`` (untuned; told the run's length when it reads it, unless
    not ``told``)."""
    import torch

    from learned_opt.evaluate import run_optimizer
    from learned_opt.optim import LearnedOptimizer
    from learned_opt.tasks import make_family

    torch.set_num_threads(1)
    rule = load(spec)
    horizon = {"total_steps": steps} if told and getattr(rule, "reads_horizon", False) else {}

    def factory(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
        return LearnedOptimizer(params, rule, lr=lr, **horizon)

    mixture = make_family(family, **kwargs)
    run = run_optimizer(mixture.members[member], seed, factory, 1.0, steps)
    return float(run.final_train_loss)


def member_names(family) -> list[str]:
    """The names of a mixture's members: its task group's where it is one, else its own."""
    from learned_opt.tasks.groups import GROUPS

    group = GROUPS.get(family.name)
    if group is not None and len(group.members) == len(family.members):
        return [m.name for m in group.members]
    return [str(m.config().get("name", f"member {i}")) for i, m in enumerate(family.members)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--weights", action="append", required=True,
                        help="a rule (twice or more; the first is the reference)")  # fmt: skip
    parser.add_argument("--family", default="validation", help="a mixture family")
    parser.add_argument("--family-kwargs", type=json.loads, default={})
    parser.add_argument("--steps", type=int, default=500, help="steps per task")
    parser.add_argument("--seeds", type=int, default=6, help="tasks per member")
    parser.add_argument("--untold", action="store_true",
                        help="never tell a rule the run's length")  # fmt: skip
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from learned_opt.evaluate import geometric_mean, task_seed
    from learned_opt.report import write_results
    from learned_opt.tasks import make_family
    from learned_opt.tasks.mixture import MixtureFamily

    if len(args.weights) < 2 or args.steps < 1 or args.seeds < 1:
        parser.error("need two or more --weights, --steps >= 1 and --seeds >= 1")
    family = make_family(args.family, **args.family_kwargs)
    if not isinstance(family, MixtureFamily):
        parser.error(f"{args.family!r} is not a mixture of members")
    from learned_opt import CheckpointError

    for spec in args.weights:  # a clear error before any run
        try:
            load(spec)
        except (ValueError, CheckpointError) as exc:
            parser.error(f"--weights {spec}: {exc}")
    names = member_names(family)
    seeds = [task_seed(MEMBER_STREAM, k) for k in range(args.seeds)]
    jobs = [(w, m, s) for w in args.weights for m in range(len(names)) for s in seeds]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.procs) as pool:
        futures = [
            pool.submit(
                final_loss, w, args.family, args.family_kwargs, m, s, args.steps, not args.untold
            )  # fmt: skip
            for w, m, s in jobs
        ]
        losses = [f.result() for f in futures]
    seconds = time.perf_counter() - start
    records = [
        {"weights": w, "family": args.family, "family_kwargs": args.family_kwargs,
         "member": names[m], "seed": s, "steps": args.steps, "told": not args.untold,
         "final_train_loss": loss}
        for (w, m, s), loss in zip(jobs, losses, strict=True)
    ]  # fmt: skip
    metric = {
        (w, name): geometric_mean(
            [r["final_train_loss"] for r in records if r["weights"] == w and r["member"] == name]
        )
        for w in args.weights
        for name in names
    }
    first, others = args.weights[0], args.weights[1:]
    described = args.family + (f" {json.dumps(args.family_kwargs)}" if args.family_kwargs else "")
    lines = [
        f"Per member of `{described}`: {args.seeds} tasks each ({args.steps} steps, "
        f"{'not told the length' if args.untold else 'told the length when a rule reads it'}), "
        f"the geometric mean of the final training losses of "
        f"`{first}` and each other rule's over it (below 1: the other rule ends lower). "
        f"{seconds / 60:.1f} min on {args.procs} processes.",
        "",
        "| member | `" + first + "` | " + " | ".join(f"`{w}` / first" for w in others) + " |",
        "| --- | ---: |" + " ---: |" * len(others),
    ]
    for name in names:
        ratios = [metric[w, name] / metric[first, name] for w in others]
        lines.append(
            f"| {name} | {metric[first, name]:.4g} | " + " | ".join(f"{r:.3f}" for r in ratios)
            + " |"
        )  # fmt: skip
    overall = [geometric_mean([metric[w, n] / metric[first, n] for n in names]) for w in others]
    lines.append("| **geometric mean of the ratios** | | " + " | ".join(
        f"**{r:.3f}**" for r in overall) + " |")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(args.out, records, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
