"""Benchmark: an optimizer on the sealed test group against tuned Adam and tuning-free optimizers.

The sealed test (``learned_opt.tasks.groups.GROUPS["sealed-test"]``: eight fixed tasks on data
parts no meta-training or validation task reads, in no (architecture, data) pair they share;
kinds of architecture recur across the groups on other data) is run once per candidate,
and every run is recorded: nothing is ever tuned or chosen on it. For every task and horizon
(``--steps``), on ``--seeds`` evaluation seeds (each fixes the task's data order and initial
parameters, the same for every optimizer), side by side in one run:

- ``adam``: Adam with a constant learning rate, tuned on a log grid (``--lrs``, widened by up
  to three values while the best is at an edge) on ``--tune-seeds`` other seeds by final
  training loss: the reference of every ratio;
- ``adam-cosine``: Adam with a linear warm-up (5% of the steps) and cosine decay towards 0, its
  learning rate tuned the same way (on that grid within a factor 10 of ``adam``'s, widened
  while the best is at its edge);
- ``muon`` and ``muon-cosine``: Muon for every tensor of 2 or more dimensions and Adam for the
  others (``sealed_optimizers.MuonAdam``), constant or with ``adam-cosine``'s schedule, tuned
  the same way (``muon`` on the whole grid, ``muon-cosine`` within a factor 10 of it);
  ``muon-hidden`` and ``muon-hidden-cosine``: the same with the usual recipe's split, Adam
  also for the input and output layers (embeddings, the first and last matrices), tuned alike;
- ``prodigy`` (``prodigyopt.Prodigy``, lr=1), ``dadapt-adam`` (``dadaptation.DAdaptAdam``, lr=1)
  and ``schedule-free`` (``schedulefree.AdamWScheduleFree``, its defaults; ``.train()`` for
  training, ``.eval()`` for the final losses): tuning-free optimizers at their documented
  defaults;
- ``learned``: ``learned_opt.LSTMOptimizer`` with ``--weights`` (default: the shipped default),
  untuned (multiplier 1); ``--total-steps`` passes each run's horizon to it (horizon-aware
  weights);
- ``learned-zeroed``: the same rule with its learned read-out set to zero
  (:func:`zero_readout`): the hand-designed part alone, an ablation;
- ``learned-cosine``: ``learned`` with ``adam-cosine``'s warm-up and cosine decay on its
  multiplier: the learned optimizer told the horizon through a schedule, as a user can do with
  ``torch.optim.lr_scheduler``.

Reported per task and as geometric means over tasks, per horizon
(:func:`learned_opt.evaluate.versus`): the final-loss ratio (mean final training loss on the
task's whole training set over tuned constant Adam's; also the held-out ratio), the speedup (the
steps tuned Adam needs to reach its own final smoothed loss over the steps the optimizer needs to
reach it), seeds won (final training loss below Adam's on the same seed), and tuned Adam's
initial and final losses (they stay well above zero). Writes
``records.jsonl`` (one line per evaluation run), ``summary.jsonl`` (one line per task, horizon
and optimizer, with the tuning scores), ``table.md`` and PNG plots into ``--out``.

    python benchmarks/sealed.py --out benchmarks/results/sealed/general-100 --steps 100
    python benchmarks/sealed.py --weights my.pt --total-steps --out ...

To measure committed code while the working tree changes, run it from an exported tree:
``git archive HEAD | tar -x -C /tmp/src`` and ``LEARNED_OPT_SOURCE_COMMIT=$(git rev-parse HEAD)
PYTHONPATH=/tmp/src python /tmp/src/benchmarks/sealed.py ...``.

Needs the tuning-free optimizers: ``pip install prodigyopt dadaptation schedulefree``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from learned_opt import LSTMOptimizer, pretrained
from learned_opt.checkpoint import load_rule
from learned_opt.cli import git_commit
from learned_opt.corpus import load_corpus
from learned_opt.evaluate import (
    DEFAULT_LR_GRID,
    SEALED_STREAMS,
    RunResult,
    run_optimizer,
    tune_lr,
    tune_lr_near,
    versus,
)
from learned_opt.report import write_jsonl
from learned_opt.rules import UpdateRule
from learned_opt.tasks.groups import GROUPS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sealed_optimizers import (  # noqa: E402  (this folder's modules)
    TUNING_FREE_LR,
    MissingBenchDependencies,
    make_factories,
    require_bench_packages,
)
from sealed_report import (  # noqa: E402
    OPTIMIZERS,
    plot,
    tables,
)


def evaluate_sealed(
    rule: UpdateRule,
    *,
    tasks: Sequence[str],
    steps: Sequence[int],
    seeds: int,
    tune_seeds: int,
    lrs: Sequence[float] = DEFAULT_LR_GRID,
    total_steps: bool = False,
    warmup_fraction: float = 0.05,
    seed: int = 0,
    group: str = "sealed-test",
    optimizers: Sequence[str] = OPTIMIZERS,
    learned_lr: float = 1.0,
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run the benchmark on ``tasks`` of ``group`` (``"sealed-test"``, or ``"validation"`` to
    choose with the same protocol: each seed then also draws the member's architecture) with
    ``optimizers`` (``adam``, the reference, always runs), the learned ones at multiplier
    ``learned_lr``.

    Returns:
        ``(records, summary)``: one record per evaluation run (:meth:`RunResult.record` plus
        ``benchmark_task`` and ``steps``), and one summary row per task, horizon and optimizer
        (see :func:`summarize_task`).
    """
    families = GROUPS[group].families()
    unknown = [t for t in tasks if t not in families]
    if unknown:
        raise ValueError(f"Unknown {group} tasks {unknown}; expected among {sorted(families)}")
    unknown = sorted(set(optimizers) - set(OPTIMIZERS))
    if unknown:
        raise ValueError(f"Unknown optimizers {unknown}; expected among {OPTIMIZERS}")
    optimizers = [o for o in OPTIMIZERS if o == "adam" or o in optimizers]
    tune, evals = SEALED_STREAMS.seeds(tune_seeds, seeds, seed)
    records: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    for name in tasks:
        family = families[name]
        for n_steps in steps:
            start = time.perf_counter()
            factories = make_factories(rule, n_steps, total_steps, warmup_fraction)
            chosen = dict(TUNING_FREE_LR)
            chosen |= dict.fromkeys(("learned", "learned-zeroed", "learned-cosine"), learned_lr)
            tuning: dict[str, Any] = {}
            # constant on the grid; scheduled near its best
            for base in ("adam", "muon", "muon-hidden"):
                scheduled = f"{base}-cosine"
                if base != "adam" and base not in optimizers and scheduled not in optimizers:
                    continue
                const = tune_lr(family, factories[base], tune, n_steps, lrs, name=base, widen=3)
                chosen[base] = const.lr
                tuning[base] = {"lr": const.lr, "scores": const.scores, "grid": const.grid}
                if scheduled in optimizers:
                    cosine = tune_lr_near(
                        family, factories[scheduled], tune, n_steps, const.grid, const.lr,
                        name=scheduled,
                    )  # fmt: skip
                    chosen[scheduled] = cosine.lr
                    tuning[scheduled] = {"lr": cosine.lr, "scores": cosine.scores}
            runs: dict[str, list[RunResult]] = {}
            for opt in optimizers:
                runs[opt] = [
                    run_optimizer(family, s, factories[opt], chosen[opt], n_steps, name=opt)
                    for s in evals
                ]
            for opt in optimizers:
                for r in runs[opt]:
                    rec = {**r.record(), "benchmark_task": name, "steps": n_steps}
                    rec["losses"] = [float(f"{v:.5g}") for v in r.losses]  # 5 digits: smaller
                    records.append(rec)
            rows = summarize_task(name, n_steps, runs, tuning)
            summary += rows
            by = {r["optimizer"]: r for r in rows}
            log(
                f"{name} T={n_steps}: Adam lr={chosen['adam']:g} "
                f"final {by['adam']['final_train']:.4g} "
                f"(initial {by['adam']['initial_loss']:.4g}); ratios "
                + ", ".join(f"{o} {by[o]['ratio_train']:.3f}" for o in optimizers[1:])
                + f"; {time.perf_counter() - start:.0f}s"
            )
    return records, summary


def summarize_task(
    task: str, steps: int, runs: dict[str, list[RunResult]], tuning: dict[str, Any]
) -> list[dict[str, Any]]:
    """One row per optimizer: :func:`learned_opt.evaluate.versus` tuned Adam (mean final train
    and held-out losses, their ratios to ``adam``'s, seeds won, the speedup on mean curves
    smoothed over 5% of the horizon, the initial loss), and for the tuned ones the tuning
    scores."""
    rows = []
    for opt, these in runs.items():
        row: dict[str, Any] = {"kind": "summary", "task": task, "steps": steps, "optimizer": opt}
        row.update(versus(these, runs["adam"]))
        if opt == "adam":
            row["won"] = row["speedup"] = None
        if opt in tuning:
            row["tuning"] = tuning[opt]
            grid = tuning[opt.removesuffix("-cosine")]["grid"]
            row["lr_at_edge"] = len(grid) > 1 and tuning[opt]["lr"] in (min(grid), max(grid))
        rows.append(row)
    return rows


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--weights",
        default=pretrained.DEFAULT,
        help=f"shipped weights name or weights file (default {pretrained.DEFAULT})",
    )
    parser.add_argument(
        "--total-steps",
        action="store_true",
        help="pass each run's horizon to the learned optimizer (horizon-aware weights)",
    )
    parser.add_argument("--steps", default="100,1000", help="comma list of horizons")
    parser.add_argument("--seeds", type=int, default=5, help="evaluation seeds")
    parser.add_argument("--tune-seeds", type=int, default=2, help="seeds that tune Adam's lr")
    parser.add_argument("--lrs", default=",".join(map(str, DEFAULT_LR_GRID)), help="Adam's grid")
    parser.add_argument(
        "--group",
        default="sealed-test",
        choices=("sealed-test", "validation"),
        help="the task group: the sealed test, or the validation group (for choosing)",
    )
    parser.add_argument("--tasks", default=None, help="comma list of the group's tasks (all)")
    parser.add_argument(
        "--optimizers", default=",".join(OPTIMIZERS), help="comma list (adam always runs)"
    )
    parser.add_argument(
        "--learned-lr", type=float, default=1.0, help="LSTMOptimizer's lr multiplier (untuned: 1)"
    )
    parser.add_argument("--warmup-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="the seed streams")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        require_bench_packages()
    except MissingBenchDependencies as exc:
        print(exc, file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    members = [m.name for m in GROUPS[args.group].members]
    tasks = members if args.tasks is None else [t.strip() for t in args.tasks.split(",")]
    unknown = [t for t in tasks if t not in members]
    if unknown:
        print(f"unknown tasks {unknown}; choose from {members}", file=sys.stderr)
        return 2
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    if unknown := sorted(set(optimizers) - set(OPTIMIZERS)):
        print(f"unknown optimizers {unknown}; choose from {list(OPTIMIZERS)}", file=sys.stderr)
        return 2
    steps = [int(s) for s in args.steps.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    if args.seeds < 1 or args.tune_seeds < 1 or min(steps) < 1:
        print("--seeds, --tune-seeds and --steps must be positive", file=sys.stderr)
        return 2
    try:
        rule, _ = load_rule(pretrained.resolve(args.weights))
        if args.total_steps:  # fails now, not after an hour, if the rule cannot read it
            LSTMOptimizer([torch.zeros(1, requires_grad=True)], weights=rule, total_steps=1)
    except (ValueError, TypeError) as exc:
        print(f"--weights {args.weights}: {exc}", file=sys.stderr)
        return 2
    # The code that runs (the tree may change during a long run); a tree exported with
    # `git archive` has no .git: its commit is then given as LEARNED_OPT_SOURCE_COMMIT.
    commit = git_commit()
    if commit == "unknown":
        commit = os.environ.get("LEARNED_OPT_SOURCE_COMMIT", "unknown") + " (exported tree)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:  # (before the runs: a failure here loses none of them)
        corpus_digest: str | None = load_corpus().digest
    except Exception:  # noqa: BLE001 (a Python without its documentation's text)
        corpus_digest = None
    start = time.perf_counter()
    records, summary = evaluate_sealed(
        rule,
        tasks=tasks,
        steps=steps,
        seeds=args.seeds,
        tune_seeds=args.tune_seeds,
        lrs=lrs,
        total_steps=args.total_steps,
        warmup_fraction=args.warmup_fraction,
        seed=args.seed,
        group=args.group,
        optimizers=optimizers,
        learned_lr=args.learned_lr,
    )
    elapsed = time.perf_counter() - start
    command = " ".join(argv if argv is not None else sys.argv[1:])
    meta = {
        "kind": "meta",
        "command": f"python benchmarks/sealed.py {command}",
        "commit": commit,
        "weights": args.weights,
        "total_steps": args.total_steps,
        "group": args.group,
        "learned_lr": args.learned_lr,
        "python": platform.python_version(),
        "torch": torch.__version__,
        # The language models' text is Python's own documentation: it differs between Python
        # releases, and so do those tasks.
        "corpus_digest": corpus_digest,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "seconds": elapsed,
        "tasks": {m.name: m.build().config() for m in GROUPS[args.group].members},
    }
    write_jsonl(out / "records.jsonl", records)
    write_jsonl(out / "summary.jsonl", [meta, *summary])
    body = tables(summary)
    sealed_run = args.group == "sealed-test"
    untuned = args.learned_lr == 1.0
    header = (
        f"# {'Sealed test' if sealed_run else 'Validation group'}: `{args.weights}` vs tuned "
        "Adam and tuning-free optimizers\n\n"
        f"Command: `{meta['command']}`  \n"
        f"Commit: {commit}; torch {torch.__version__}; {platform.machine()}, "
        f"{torch.get_num_threads()} thread(s); {elapsed / 60:.1f} min; {args.seeds} evaluation "
        f"seeds; Adam's lr tuned on {args.tune_seeds} other seeds over {lrs}, widened by up "
        f"to 3 values past an edge (cosine: warm-up "
        f"{args.warmup_fraction:.0%} of the steps); learned optimizer "
        + ("untuned" if untuned else f"at lr multiplier {args.learned_lr:g}")
        + (", told the horizon (total_steps)" if args.total_steps else "")
        + ".\n\n"
        + (
            "The sealed test is run once per candidate and never used to choose anything. "
            if sealed_run
            else "The validation group is for choosing; each seed draws the member's "
            "architecture as well as its data order and initialization. "
        )
        + "Ratios are mean final losses (whole training set; held-out set) over tuned constant "
        "Adam's. Speedups compare mean minibatch-loss curves smoothed over 5% of the horizon "
        "(schedule-free's curve is at its training point, its final losses at its averaged "
        "point).\n\n"
    )
    (out / "table.md").write_text(header + body)
    print("\n" + body)
    written = plot(records, summary, out)
    print(
        f"wrote {out / 'records.jsonl'}, {out / 'summary.jsonl'}, {out / 'table.md'}, "
        + ", ".join(str(p) for p in written),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
