"""Benchmark: a learned optimizer vs tuned Adam on tasks outside its meta-training distribution.

Does a learned optimizer beat tuned Adam on models and horizons it never saw? The tasks
(:data:`learned_opt.ood.OOD_TASKS`) are outside the ``"diverse"`` meta-training distribution
(:class:`learned_opt.tasks.DiverseFamily`): other widths, depths, batch sizes, architectures
(conv nets on 8x8 digits, GRUs), datasets (wine, breast cancer) and horizons (100 and 1000 steps,
where meta-training unrolls are shorter). For every task and horizon, Adam's learning rate is
tuned on a grid on tuning seeds disjoint from the evaluation seeds; the learned optimizer runs as
shipped (multiplier 1.0). Reported: per task and horizon, the ratio of the learned optimizer's
mean final training loss (whole training set) to tuned Adam's, and their geometric mean over all
tasks and horizons (below 1: the learned optimizer wins). Writes ``records.jsonl`` (one line per
run), ``table.md`` and ``curves/<task>-<steps>.png`` into ``--out``.

Several weights (``--weights label=file,label=file,...``) are measured side by side against the
same tuned Adam runs: the summary then has one ratio column per weights, e.g. an ablation of the
general rule's options, each meta-trained with the same budget.

    python benchmarks/ood.py --weights my_general.pt --out benchmarks/results/ood
    python benchmarks/ood.py --weights full=a.pt,no-nominal=b.pt,paper=paper-mnist --out ...
    python benchmarks/ood.py --smoke --out /tmp/ood-smoke
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from learned_opt import pretrained
from learned_opt.cli import git_commit
from learned_opt.evaluate import (
    COMPARISON_STREAMS,
    DEFAULT_LR_GRID,
    HAND_DESIGNED,
    OptimizerFactory,
    RunResult,
    geometric_mean,
    run_optimizer,
    seeds_won,
    tune_lr,
    versus,
)
from learned_opt.ood import OOD_TASKS, load_learned, parse_weights
from learned_opt.optim import LearnedOptimizer
from learned_opt.report import plot_curves, table, write_jsonl
from learned_opt.rules import UpdateRule


def evaluate_ood(
    rules: dict[str, UpdateRule],
    *,
    tasks: Sequence[str],
    steps: Sequence[int],
    seeds: int,
    tune_seeds: int,
    lrs: Sequence[float] = DEFAULT_LR_GRID,
    holdout: str = "test",
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run the benchmark for each of ``rules`` (label -> rule) against one tuned Adam.

    Returns:
        ``(records, rows)``: one record per run (:meth:`RunResult.record` plus ``benchmark_task``
        and ``steps``; the learned runs are named ``learned:<label>``), and one summary row per
        task and horizon with ``learned_{train,test}`` and ``ratio_{train,test}`` dicts by label.
    """
    tune, evals = COMPARISON_STREAMS.seeds(tune_seeds, seeds, seed)
    adam = HAND_DESIGNED["adam"]

    def learned(rule: UpdateRule) -> OptimizerFactory:
        return lambda p, lr: LearnedOptimizer(p, rule, lr=lr)

    records: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for name in tasks:
        family = OOD_TASKS[name](holdout)
        for n_steps in steps:
            start = time.perf_counter()
            tuning = tune_lr(family, adam, tune, n_steps, lrs, name="adam")
            runs: dict[str, list[RunResult]] = {
                "adam": [
                    run_optimizer(family, s, adam, tuning.lr, n_steps, name="adam") for s in evals
                ]
            }
            for label, rule in rules.items():
                runs[f"learned:{label}"] = [
                    run_optimizer(family, s, learned(rule), 1.0, n_steps, name=f"learned:{label}")
                    for s in evals
                ]
            for these in runs.values():
                for r in these:
                    rec = r.record()
                    rec.update(benchmark_task=name, steps=n_steps, family=family.config())
                    records.append(rec)
            reference = versus(runs["adam"], runs["adam"])
            by_label = {k: versus(runs[f"learned:{k}"], runs["adam"]) for k in rules}
            row: dict[str, Any] = {
                "task": name,
                "steps": n_steps,
                "adam_lr": tuning.lr,
                "adam_lr_at_edge": tuning.at_edge,
            }
            for metric, key in (("final_train_loss", "train"), ("final_test_loss", "test")):
                row[f"adam_{key}"] = reference[f"final_{key}"]
                row[f"learned_{key}"] = {k: v[f"final_{key}"] for k, v in by_label.items()}
                row[f"ratio_{key}"] = {k: v[f"ratio_{key}"] for k, v in by_label.items()}
                row[f"won_{key}"] = {
                    k: seeds_won(runs[f"learned:{k}"], runs["adam"], metric) for k in rules
                }
            row["seeds"] = len(evals)
            rows.append(row)
            ratios = ", ".join(f"{k} {v:.3f}" for k, v in row["ratio_train"].items())
            log(
                f"{name} T={n_steps}: learned/Adam final train loss: {ratios} (Adam "
                f"{row['adam_train']:.4g} at lr={tuning.lr:g}"
                f"{', at the edge of the grid' if tuning.at_edge else ''}); "
                f"{time.perf_counter() - start:.1f}s"
            )
    return records, rows


def summary_table(rows: list[dict[str, Any]], key: str = "train") -> str:
    """Markdown: one line per task and horizon with each weights' ratio (learned / tuned Adam
    final loss, ``key`` = ``"train"`` or ``"test"``), then the geometric means of the ratios."""
    labels = list(rows[0][f"ratio_{key}"]) if rows else []
    lines = [
        "| task | steps | Adam lr | Adam final loss | " + " | ".join(labels) + " |",
        "| --- | ---: | ---: | ---: |" + " ---: |" * len(labels),
    ]
    for r in rows:
        lr = f"{r['adam_lr']:g}" + (" (edge)" if r["adam_lr_at_edge"] else "")
        cells = " | ".join(f"{r[f'ratio_{key}'][k]:.3f}" for k in labels)
        lines.append(f"| {r['task']} | {r['steps']} | {lr} | {r[f'adam_{key}']:.4g} | {cells} |")

    def geo(sub: list[dict[str, Any]]) -> str:
        return " | ".join(
            f"**{geometric_mean([r[f'ratio_{key}'][k] for r in sub]):.3f}**" for k in labels
        )

    for n_steps in sorted({r["steps"] for r in rows}):
        sub = [r for r in rows if r["steps"] == n_steps]
        lines.append(f"| **geometric mean** | {n_steps} | | | {geo(sub)} |")
    lines.append(f"| **geometric mean, all** | | | | {geo(rows)} |")
    worst = " | ".join(f"{max(r[f'ratio_{key}'][k] for r in rows):.3f}" for k in labels)
    lines.append(f"| worst task | | | | {worst} |")
    return "\n".join(lines)


def seeds_won_table(rows: list[dict[str, Any]], key: str = "train") -> str:
    """Markdown: per task and horizon, on how many evaluation seeds each weights' final loss is
    below tuned Adam's on the same seed (``won/seeds``), then the totals."""
    labels = list(rows[0][f"won_{key}"]) if rows else []
    lines = [
        "| task | steps | " + " | ".join(labels) + " |",
        "| --- | ---: |" + " ---: |" * len(labels),
    ]
    for r in rows:
        cells = " | ".join(f"{r[f'won_{key}'][k]}/{r['seeds']}" for k in labels)
        lines.append(f"| {r['task']} | {r['steps']} | {cells} |")
    total = sum(r["seeds"] for r in rows)
    cells = " | ".join(f"**{sum(r[f'won_{key}'][k] for r in rows)}/{total}**" for k in labels)
    lines.append(f"| **all** | | {cells} |")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--weights",
        default=None,
        help=f"comma list of [label=]shipped name or file (default {pretrained.DEFAULT})",
    )
    parser.add_argument("--steps", default="100,1000", help="comma list of horizons")
    parser.add_argument("--seeds", type=int, default=10, help="evaluation seeds")
    parser.add_argument("--tune-seeds", type=int, default=3, help="seeds that tune Adam's lr")
    parser.add_argument("--lrs", default=",".join(map(str, DEFAULT_LR_GRID)))
    parser.add_argument("--tasks", default=",".join(OOD_TASKS), help="comma list of tasks")
    parser.add_argument("--holdout", default="test", choices=["val", "test"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="a tiny run (seconds), for tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.weights, args.steps, args.seeds, args.tune_seeds, args.lrs = (
            args.weights or "paper-mnist",
            "3,6",
            1,
            1,
            "0.001,0.01",
        )
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in OOD_TASKS]
    if unknown:
        print(f"unknown tasks {unknown}; choose from {sorted(OOD_TASKS)}", file=sys.stderr)
        return 2
    steps = [int(s) for s in args.steps.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    try:
        weights = parse_weights(args.weights or pretrained.DEFAULT)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    rules = {label: load_learned(path) for label, path in weights.items()}
    commit = git_commit()  # the code that runs (the tree may change during a long run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records, rows = evaluate_ood(
        rules,
        tasks=tasks,
        steps=steps,
        seeds=args.seeds,
        tune_seeds=args.tune_seeds,
        lrs=lrs,
        holdout=args.holdout,
        seed=args.seed,
    )
    write_jsonl(out / "records.jsonl", records)
    for name in tasks:
        for n_steps in steps:
            sub = [r for r in records if r["benchmark_task"] == name and r["steps"] == n_steps]
            plot_curves(sub, out / "curves" / f"{name}-{n_steps}.png", title=f"{name}, {n_steps}")
    summary, held_out = summary_table(rows, "train"), summary_table(rows, "test")
    print(f"\nlearned / tuned Adam, final training loss (whole training set):\n\n{summary}")
    details = []
    for name in tasks:
        for n_steps in steps:
            sub = [r for r in records if r["benchmark_task"] == name and r["steps"] == n_steps]
            details.append(f"### {name}, {n_steps} steps\n\n{table(sub, 'adam')}\n")
    command = " ".join(argv if argv is not None else sys.argv[1:])
    header = (
        f"# {', '.join(weights)} out of distribution vs tuned Adam\n\n"
        f"Command: `python benchmarks/ood.py {command}`  \n"
        f"Commit: {commit}; torch {torch.__version__}; {platform.machine()}, "
        f"{torch.get_num_threads()} threads; {args.seeds} evaluation seeds, Adam's lr tuned on "
        f"{args.tune_seeds} other seeds over {lrs}; holdout {args.holdout!r}\n\n"
        "Ratios are mean final losses of the learned optimizer over tuned Adam's; below 1 "
        "the learned optimizer wins. Weights: "
        + ", ".join(f"`{k}` = `{v}`" for k, v in weights.items())
        + "\n\n"
    )
    (out / "table.md").write_text(
        header
        + "## Final training loss (whole training set)\n\n"
        + summary
        + "\n\n## Seeds won (final training loss below tuned Adam's on the same task seed)\n\n"
        + seeds_won_table(rows, "train")
        + "\n\n## Final held-out loss\n\n"
        + held_out
        + "\n\n## Per task (final train loss over seeds)\n\n"
        + "\n".join(details)
    )
    sys.stdout.flush()
    print(f"wrote {out / 'records.jsonl'}, {out / 'table.md'}, {out / 'curves'}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
