"""The ``learned-opt`` command: ``meta-train``, ``eval`` and ``export``."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import distributed, pretrained
from .checkpoint import CheckpointError, load_rule, safe_load, save_rule
from .estimators import ESTIMATORS
from .evaluate import DEFAULT_LR_GRID, run_optimizer, task_seed, tune_lr
from .meta_train import META_LR_SCHEDULES, MetaTrainConfig, MetaTrainer
from .optim import LearnedOptimizer
from .report import HAND_DESIGNED, plot_curves, table, write_jsonl
from .tasks import FAMILIES, MLPFamily, make_family

__all__ = ["main", "build_parser", "git_commit"]

_TUNE_STREAM = 1_000_003
_EVAL_STREAM = 2_000_003


def _segment_arg(text: str) -> int | tuple[int, ...]:
    """``--grad-checkpoint-segment``: ``S`` or ``S1,S2,...``."""
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an integer or a comma-separated list: {text!r}"
        ) from None
    return sizes[0] if len(sizes) == 1 else sizes


def git_commit() -> str:
    """The current commit (with ``+dirty`` when the tree has changes), or ``"unknown"``."""
    try:
        here = Path(__file__).resolve().parent
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _json_arg(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="learned-opt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    mt = sub.add_parser("meta-train", help="meta-train a learned optimizer on a task family")
    d = MetaTrainConfig()
    mt.add_argument("--family", default=d.family, choices=sorted(FAMILIES))
    mt.add_argument("--family-kwargs", type=_json_arg, default={}, metavar="JSON")
    mt.add_argument("--rule", default=d.rule)
    mt.add_argument(
        "--rule-kwargs",
        type=_json_arg,
        default={},
        metavar="JSON",
        help='e.g. \'{"hidden_size": 20, "num_layers": 2, "preprocess_p": 5}\'',
    )
    mt.add_argument("--init-weights", default=None, help="start from these weights (fine-tune)")
    mt.add_argument("--horizon", type=int, default=d.horizon, help="inner steps per task (T)")
    mt.add_argument(
        "--min-horizon",
        type=int,
        default=None,
        help="draw each task's horizon log-uniformly in [min-horizon, horizon] (heavy-tailed)",
    )
    mt.add_argument("--truncation", type=int, default=d.truncation, help="steps per window (K)")
    mt.add_argument(
        "--estimator",
        default=d.estimator,
        choices=sorted(ESTIMATORS),
        help="meta-gradient estimator: truncated backpropagation, persistent ES (unbiased, "
        "memory independent of K and T) or truncated antithetic ES",
    )
    mt.add_argument(
        "--estimator-kwargs",
        type=_json_arg,
        default={},
        metavar="JSON",
        help='e.g. \'{"sigma": 0.01, "pairs": 8}\' for pes/es',
    )
    mt.add_argument("--objective", default=d.objective, choices=["train", "test"])
    mt.add_argument(
        "--log-meta-loss",
        action="store_true",
        help="meta-loss = log of the objective (tasks of any loss scale weigh alike); the "
        "evaluation then reports geometric means",
    )
    mt.add_argument(
        "--loss-aversion",
        type=float,
        default=None,
        metavar="LAMBDA",
        help="loss-averse meta-objective: a window's meta-loss is log(L / L_ref) against the "
        "rule the run starts from (unrolled beside it on the same batches), times 1 + LAMBDA "
        "where positive; needs --log-meta-loss and tbptt",
    )
    mt.add_argument("--second-order", action="store_true")
    mt.add_argument(
        "--grad-checkpoint",
        action="store_true",
        help="gradient checkpointing: recompute the inner steps during the meta-backward "
        "instead of keeping them (by default nested segments: O(log K) inner states and one "
        "step's activations alive instead of K steps', for ~ceil(log8 K) extra forward passes; "
        "same meta-gradients; with glibc, also set MALLOC_MMAP_THRESHOLD_=131072 in the "
        "environment, or the freed memory stays in the heap: see the README)",
    )
    mt.add_argument(
        "--grad-checkpoint-segment",
        type=_segment_arg,
        default=None,
        metavar="S[,S2,...]",
        help="inner steps per checkpointed segment (one level), or nested segment lengths "
        "S1 > S2 > ... (e.g. 25,5,1); default: checkpoint_schedule(truncation)",
    )
    mt.add_argument("--meta-lr", type=float, default=d.meta_lr)
    mt.add_argument(
        "--meta-lr-schedule",
        choices=META_LR_SCHEDULES,
        default=d.meta_lr_schedule,
        help="cosine: decay the meta learning rate to 0 over --iterations",
    )
    mt.add_argument("--meta-batch", type=int, default=d.meta_batch)
    mt.add_argument("--clip-grad", type=float, default=d.clip_grad)
    mt.add_argument("--iterations", type=int, default=d.iterations, help="task batches to unroll")
    mt.add_argument("--time-budget", type=float, default=None, help="seconds of meta-training")
    mt.add_argument("--eval-every", type=int, default=d.eval_every)
    mt.add_argument("--eval-tasks", type=int, default=d.eval_tasks)
    mt.add_argument(
        "--eval-horizon",
        type=int,
        default=None,
        help="inner steps of the held-out evaluation (default: --horizon)",
    )
    mt.add_argument(
        "--eval-family",
        default=None,
        choices=sorted(FAMILIES),
        help="family of the held-out tasks that select the best weights (default: --family)",
    )
    mt.add_argument("--eval-family-kwargs", type=_json_arg, default={}, metavar="JSON")
    mt.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    mt.add_argument("--seed", type=int, default=d.seed)
    mt.add_argument("--log-dir", default=None, help="TensorBoard directory")
    mt.add_argument("--ckpt-dir", default=None, help="checkpoint directory")
    mt.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    mt.add_argument("--export", default=None, help="write the best weights (with metadata) here")
    mt.add_argument("--quiet", action="store_true", help="no progress line")
    mt.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        help="seconds a rank waits for the others before failing (under torchrun)",
    )
    mt.add_argument("--note", action="append", default=[], help="provenance note kept with the run")

    ex = sub.add_parser(
        "export",
        help="write a meta-trainer checkpoint's best or latest rule as a weights file (with "
        "the run's provenance as metadata, also beside it as JSON)",
    )
    ex.add_argument("checkpoint", help="a meta-trainer checkpoint (ckpt_*.pt)")
    ex.add_argument("out", help="the weights file to write")
    ex.add_argument(
        "--which",
        default="best",
        choices=["best", "latest"],
        help="the rule selected by held-out evaluation, or the one at the checkpoint's iteration",
    )

    ev = sub.add_parser("eval", help="a learned optimizer against tuned hand-designed optimizers")
    ev.add_argument(
        "--weights",
        default=pretrained.DEFAULT,
        help=f"shipped name {pretrained.available()} or a weights/checkpoint file",
    )
    ev.add_argument("--family", default="mnist", choices=sorted(FAMILIES))
    ev.add_argument("--family-kwargs", type=_json_arg, default={}, metavar="JSON")
    ev.add_argument("--steps", type=int, default=100)
    ev.add_argument("--seeds", type=int, default=10, help="evaluation seeds")
    ev.add_argument("--tune-seeds", type=int, default=3, help="seeds used to tune learning rates")
    ev.add_argument("--baselines", default="adam", help="comma list of " + ",".join(HAND_DESIGNED))
    ev.add_argument("--lrs", default=",".join(map(str, DEFAULT_LR_GRID)))
    ev.add_argument("--records", default=None, help="JSONL output of every run")
    ev.add_argument("--plot", default=None, help="PNG of the loss curves")
    ev.add_argument("--seed", type=int, default=0)
    return parser


def _init_metadata(init_weights: str | None) -> dict[str, Any] | None:
    """Provenance of the weights a fine-tuning run started from (their own metadata)."""
    if init_weights is None:
        return None
    return {"weights": init_weights, **load_rule(pretrained.resolve(init_weights))[1]}


def _meta_train(args: argparse.Namespace, argv: list[str]) -> int:
    multi = distributed.init_from_env(timeout_s=args.dist_timeout)
    try:
        return _meta_train_inner(args, argv)
    finally:
        if multi:
            distributed.shutdown()


def _meta_train_inner(args: argparse.Namespace, argv: list[str]) -> int:
    main_rank = distributed.is_main()
    family_kwargs = dict(args.family_kwargs)
    config = MetaTrainConfig(
        family=args.family,
        family_kwargs=family_kwargs,
        rule=args.rule,
        rule_kwargs=args.rule_kwargs,
        init_weights=args.init_weights,
        horizon=args.horizon,
        min_horizon=args.min_horizon,
        truncation=args.truncation,
        objective=args.objective,
        log_meta_loss=args.log_meta_loss,
        second_order=args.second_order,
        estimator=args.estimator,
        estimator_kwargs=args.estimator_kwargs,
        loss_aversion=args.loss_aversion,
        grad_checkpoint=args.grad_checkpoint or args.grad_checkpoint_segment is not None,
        grad_checkpoint_segment=args.grad_checkpoint_segment,
        meta_lr=args.meta_lr,
        meta_lr_schedule=args.meta_lr_schedule,
        meta_batch=args.meta_batch,
        clip_grad=args.clip_grad,
        iterations=args.iterations,
        time_budget=args.time_budget,
        eval_every=args.eval_every,
        eval_tasks=args.eval_tasks,
        eval_horizon=args.eval_horizon,
        eval_family=args.eval_family,
        eval_family_kwargs=args.eval_family_kwargs,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    trainer = MetaTrainer(
        config,
        log_dir=args.log_dir,
        ckpt_dir=args.ckpt_dir,
        progress=main_rank and not args.quiet,
    )
    if args.resume:
        if args.ckpt_dir is None:
            print("--resume needs --ckpt-dir", file=sys.stderr)
            return 2
        if trainer.resume() and main_rank:
            print(f"resumed at iteration {trainer.iteration}", file=sys.stderr)
    command = "learned-opt " + shlex.join(argv)
    trainer.notes.setdefault("commands", []).append(
        {"command": command, "commit": git_commit(), "start_iteration": trainer.iteration}
    )
    trainer.notes.setdefault("notes", []).extend(args.note)
    start = time.time()
    trainer.train()
    trainer.close()
    adam = trainer.adam_baseline or {}
    summary = {
        "iterations": trainer.iteration,
        "meta_train_seconds": round(trainer.elapsed, 1),
        "best_eval_metric": trainer.best_metric,
        "best_iteration": trainer.best_iteration,
        "adam_tuned_eval_metric": adam.get("metric"),
        "adam_tuned_lr": adam.get("lr"),
        "skipped_meta_steps": trainer.skipped_steps,
        "world_size": distributed.world_size(),
    }
    if not main_rank:
        return 0
    print(json.dumps(summary))
    if args.export:
        trainer.export_best(
            args.export,
            {
                "command": command,
                "all_commands": trainer.notes.get("commands", []),
                "notes": trainer.notes.get("notes", []),
                "commit": git_commit(),
                "config": config.to_dict(),
                "budget": {
                    "iterations": trainer.iteration,
                    "seconds": round(trainer.elapsed, 1),
                    "wall_seconds_this_session": round(time.time() - start, 1),
                    "torch_threads": torch.get_num_threads(),
                    "processes": distributed.world_size(),
                },
                "figures": summary,
                "initialized_from": _init_metadata(config.init_weights),
            },
        )
        meta_path = Path(args.export).with_suffix(".json")
        meta_path.write_text(json.dumps(load_rule(args.export)[1], indent=2) + "\n")
        print(f"wrote {args.export} and {meta_path}", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    # Final figures train on the whole training split and report the official held-out split;
    # meta-training selects weights on a validation split carved from the training data instead.
    defaults = {"holdout": "test"} if FAMILIES[args.family][0] is MLPFamily else {}
    family = make_family(args.family, **{**defaults, **args.family_kwargs})
    rule, _ = load_rule(pretrained.resolve(args.weights))
    lrs = [float(x) for x in args.lrs.split(",")]
    tune = [task_seed(args.seed, _TUNE_STREAM, k) for k in range(args.tune_seeds)]
    evals = [task_seed(args.seed, _EVAL_STREAM, k) for k in range(args.seeds)]
    records: list[dict[str, Any]] = []

    def learned(p: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
        return LearnedOptimizer(p, rule, lr=lr)

    for name in [b.strip() for b in args.baselines.split(",") if b.strip()]:
        if name not in HAND_DESIGNED:
            print(
                f"unknown baseline {name!r}; choose from {sorted(HAND_DESIGNED)}", file=sys.stderr
            )
            return 2
        best, scores = tune_lr(family, HAND_DESIGNED[name], tune, args.steps, lrs, name=name)
        grid = ", ".join(f"{lr:g}: {s:.4g}" for lr, s in scores.items())
        print(
            f"tuned {name}: lr={best:g} (mean final train loss on tuning seeds: {grid})",
            file=sys.stderr,
        )
        if len(lrs) > 1 and best in (min(lrs), max(lrs)):
            print(
                f"warning: the best {name} learning rate {best:g} is at the edge of the grid; "
                "widen --lrs",
                file=sys.stderr,
            )
        records += [
            run_optimizer(family, s, HAND_DESIGNED[name], best, args.steps, name=name).record()
            for s in evals
        ]
    records += [
        run_optimizer(family, s, learned, 1.0, args.steps, name=f"learned:{args.weights}").record()
        for s in evals
    ]
    for r in records:
        r["family"] = family.config()
        r["steps"] = args.steps
    reference = args.baselines.split(",")[0].strip()
    print(
        f"\n{family.config()} after {args.steps} steps, {args.seeds} seeds; "
        "final loss on the whole training set:\n"
    )
    print(table(records, reference))
    print("\nheld-out loss:\n")
    print(table(records, reference, metric="final_test_loss"))
    if args.records:
        write_jsonl(args.records, records)
        print(f"\nwrote {args.records}", file=sys.stderr)
    if args.plot:
        plot_curves(records, args.plot, title=f"{args.family}, {args.steps} steps")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "meta-train":
        return _meta_train(args, argv)
    if args.command == "export":
        return _export(args)
    return _eval(args)


def _export(args: argparse.Namespace) -> int:
    """``learned-opt export``: a checkpoint's rule as a weights file, with provenance."""
    state = safe_load(args.checkpoint)
    if not isinstance(state, dict) or "best_rule" not in state:
        raise CheckpointError(f"{args.checkpoint} is not a meta-trainer checkpoint")
    rule, meta = load_rule(args.checkpoint, which=args.which)
    notes = state.get("notes") or {}
    meta.update(
        {
            "exported": {
                "checkpoint": str(args.checkpoint),
                "which": args.which,
                "checkpoint_iteration": state.get("iteration"),
                "meta_train_seconds": round(float(state.get("elapsed", 0.0)), 1),
                "command": shlex.join(["learned-opt", "export", *sys.argv[2:]])
                if sys.argv[1:2] == ["export"]
                else None,
                "commit": git_commit(),
            },
            "all_commands": notes.get("commands", []),
            "eval_history": state.get("history", {}),
        }
    )
    save_rule(args.out, rule, meta)
    meta_path = Path(args.out).with_suffix(".json")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out} and {meta_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
