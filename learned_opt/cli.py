"""The ``learned-opt`` command: ``meta-train``, ``eval`` and ``export``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shlex
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any

import torch

from . import distributed, pretrained
from .checkpoint import CheckpointError, load_rule, safe_load, save_rule
from .evaluate import (
    COMPARISON_STREAMS,
    DEFAULT_LR_GRID,
    HAND_DESIGNED,
    evaluation_family,
    run_optimizer,
    tune_lr,
)
from .files import atomic_write_text
from .optim import LearnedOptimizer
from .outer import MetaTrainConfig, MetaTrainer
from .report import git_commit, plot_curves, provenance, read_jsonl, table, write_jsonl
from .tasks import FAMILIES

__all__ = [
    "add_config_options",
    "build_parser",
    "config_from_args",
    "eval_report",
    "git_commit",
    "main",
]


def _json_arg(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def add_config_options(parser: argparse.ArgumentParser, cls: type = MetaTrainConfig) -> None:
    """One option per field of the dataclass ``cls`` whose metadata has ``cli`` true: field
    ``foo_bar`` becomes ``--foo-bar`` with the field's default and ``help``; its type says how
    the text reads (``bool``: a switch; ``dict``: a JSON object; ``X | None``: an ``X``), unless
    the metadata's ``parse`` does; the metadata may also give ``choices`` (or a function giving
    them) and a ``metavar``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli"):
            continue
        flag = "--" + f.name.replace("_", "-")
        missing = f.default is dataclasses.MISSING
        default = f.default_factory() if missing else f.default  # type: ignore[misc]
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag, action="store_true", default=default, help=meta["help"])
            continue
        union = typing.get_origin(kind) in (typing.Union, types.UnionType)
        kinds = [t for t in typing.get_args(kind) if t is not type(None)] if union else [kind]
        options: dict[str, Any] = {"default": default, "help": meta["help"]}
        if meta.get("parse") is not None:
            options["type"] = meta["parse"]
        elif all(typing.get_origin(t) is dict for t in kinds):
            options["type"], options["metavar"] = _json_arg, "JSON"
        elif len(kinds) == 1 and kinds[0] in (int, float, str):
            options["type"] = kinds[0]
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no command-line reading of {kind}")
        choices = meta.get("choices")
        if choices is not None:
            options["choices"] = choices() if callable(choices) else list(choices)
        if meta.get("metavar") is not None:
            options["metavar"] = meta["metavar"]
        parser.add_argument(flag, **options)


def config_from_args(args: argparse.Namespace) -> MetaTrainConfig:
    """The configuration the ``meta-train`` options of :func:`add_config_options` give;
    ``--grad-checkpoint-segment`` switches gradient checkpointing on."""
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(MetaTrainConfig)
        if f.metadata.get("cli")
    }
    if values["grad_checkpoint_segment"] is not None:
        values["grad_checkpoint"] = True
    return MetaTrainConfig(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="learned-opt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    mt = sub.add_parser("meta-train", help="meta-train a learned optimizer on a task family")
    add_config_options(mt)
    mt.add_argument("--log-dir", default=None, help="TensorBoard directory")
    mt.add_argument("--ckpt-dir", default=None, help="checkpoint directory")
    mt.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    mt.add_argument("--export", default=None, help="write the best weights (with metadata) here")
    mt.add_argument("--quiet", action="store_true", help="no progress line")
    mt.add_argument(
        "--dist-timeout",
        type=float,
        default=1800.0,
        help="seconds a rank waits for the others before failing (under torchrun; ranks whose "
        "tasks differ in length wait for each other at every meta-iteration)",
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
    ev.add_argument(
        "--total-steps",
        action="store_true",
        help="tell the learned optimizer the run's length (--steps), for weights that read it",
    )
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


def _usage_error(command: str, message: str) -> int:
    """A one-line error for what the user gave (no traceback), exit code 2 as argparse's."""
    print(f"learned-opt {command}: error: {message}", file=sys.stderr)
    return 2


def _weights_path_error(path: str | None) -> str | None:
    """Why ``path`` cannot take a weights file (with its metadata beside it as JSON)."""
    if path is None:
        return None
    if Path(path).suffix == ".json":
        return f"{path}: the weights need a name not ending in .json (their metadata goes there)"
    if Path(path).is_dir():
        return f"{path} is a directory; name the weights file to write"
    return None


def _meta_train_inner(args: argparse.Namespace, argv: list[str]) -> int:
    main_rank = distributed.is_main()
    if error := _weights_path_error(args.export):  # before training, not after it
        return _usage_error("meta-train", f"--export {error}")
    if args.resume and args.ckpt_dir is None:
        return _usage_error("meta-train", "--resume needs --ckpt-dir")
    try:  # what the options and files given can get wrong: one line, before any work
        config = config_from_args(args)
        trainer = MetaTrainer(
            config,
            log_dir=args.log_dir,
            ckpt_dir=args.ckpt_dir,
            progress=main_rank and not args.quiet,
        )
        if args.resume and trainer.resume() and main_rank:
            print(f"resumed at iteration {trainer.iteration}", file=sys.stderr)
        trainer.check_outputs()  # unwritable folders; an earlier run's checkpoints, not resumed
    except (ValueError, TypeError, ImportError, CheckpointError, OSError) as exc:
        return _usage_error("meta-train", str(exc))  # (bad family or estimator options too)
    command = "learned-opt " + shlex.join(argv)
    trainer.notes.setdefault("commands", []).append(
        {"command": command, "commit": git_commit(), "start_iteration": trainer.iteration}
    )
    trainer.notes.setdefault("notes", []).extend(args.note)
    start = time.time()
    try:
        trainer.train()
    except KeyboardInterrupt as exc:  # (the trainer warned what it saved)
        trainer.close()
        cause = trainer._stopped_by  # a failure whose last iteration was being saved
        if main_rank:
            saving = cause is not None and cause is not exc and exc.__context__ is cause
            during = f" while saving after {cause!r}" if saving else ""
            print(f"learned-opt meta-train: interrupted{during}", file=sys.stderr)
        return 130
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
    # no evaluation: no metric (null, not JSON's non-standard Infinity)
    summary = {k: v if not isinstance(v, float) or math.isfinite(v) else None
               for k, v in summary.items()}  # fmt: skip
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
                    "wall_seconds_this_run": round(time.time() - start, 1),
                    "torch_threads": torch.get_num_threads(),
                    "processes": distributed.world_size(),
                },
                "figures": summary,
                "initialized_from": _init_metadata(config.init_weights),
            },
        )
        meta_path = Path(args.export).with_suffix(".json")
        atomic_write_text(meta_path, json.dumps(load_rule(args.export)[1], indent=2) + "\n")
        print(f"wrote {args.export} and {meta_path}", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    for name in ("steps", "seeds", "tune_seeds"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            return _usage_error("eval", f"{flag} must be at least 1, not {getattr(args, name)}")
    try:
        lrs = [float(x) for x in args.lrs.split(",")]
    except ValueError:
        return _usage_error("eval", f"--lrs {args.lrs!r}: give learning rates, comma-separated")
    if not all(math.isfinite(lr) and lr > 0 for lr in lrs):
        return _usage_error("eval", f"--lrs {args.lrs!r}: learning rates are finite and positive")
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    if unknown := [b for b in baselines if b not in HAND_DESIGNED]:
        known = ", ".join(sorted(HAND_DESIGNED))
        return _usage_error("eval", f"unknown baseline {unknown[0]!r}; choose from {known}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return _usage_error("eval", "--plot needs matplotlib: pip install 'learned_opt[plot]'")
    # Final figures train on the whole training split and report the official held-out split.
    try:
        family = evaluation_family(args.family, **args.family_kwargs)
        family.sample(torch.Generator().manual_seed(0))  # its data found, before any work
        rule, _ = load_rule(pretrained.resolve(args.weights))
    except (ValueError, TypeError, CheckpointError, OSError, ImportError) as exc:
        return _usage_error("eval", str(exc))  # bad family options, data or weights
    if args.family.startswith("meta-train") or args.family == "validation":
        print(
            f"note: {args.family!r} is a task group meta-training or selection reads: these are "
            "not held-out figures (benchmarks/sealed.py runs the sealed test group)",
            file=sys.stderr,
        )
    horizon = {"total_steps": args.steps} if args.total_steps else {}
    try:  # fails now, before any baseline is tuned, if the rule cannot read the horizon
        LearnedOptimizer([torch.zeros(1, requires_grad=True)], rule, **horizon)
    except ValueError as exc:
        print(f"--weights {args.weights}: {exc}", file=sys.stderr)
        return 2
    tune = COMPARISON_STREAMS.tune_seeds(args.tune_seeds, args.seed)
    evals = COMPARISON_STREAMS.eval_seeds(args.seeds, args.seed)
    records: list[dict[str, Any]] = []

    def learned(p: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
        return LearnedOptimizer(p, rule, lr=lr, **horizon)

    learned_name = f"learned:{args.weights}" + (
        f" (total_steps={args.steps})" if args.total_steps else ""
    )

    for name in baselines:
        tuning = tune_lr(family, HAND_DESIGNED[name], tune, args.steps, lrs, name=name, widen=3)
        grid = ", ".join(f"{lr:g}: {s:.4g}" for lr, s in tuning.scores.items())
        print(
            f"tuned {name}: lr={tuning.lr:g} (mean final train loss on tuning seeds: {grid})",
            file=sys.stderr,
        )
        if tuning.at_edge:
            print(
                f"warning: the best {name} learning rate {tuning.lr:g} is at the edge of the "
                "grid, widened by 3 values; widen --lrs",
                file=sys.stderr,
            )
        tuned = {"lr_at_edge": tuning.at_edge, "lr_grid": tuning.grid}
        records += [
            run_optimizer(family, s, HAND_DESIGNED[name], tuning.lr, args.steps, name=name).record()
            | tuned
            for s in evals
        ]
    records += [
        run_optimizer(family, s, learned, 1.0, args.steps, name=learned_name).record()
        for s in evals
    ]
    for r in records:
        r["family"] = family.config()
        r["steps"] = args.steps
    reference = baselines[0] if baselines else ""
    print(
        f"\n{family.config()} after {args.steps} steps, {args.seeds} seeds; "
        "final loss on the whole training set:\n"
    )
    print(table(records, reference))
    print("\nheld-out loss:\n")
    print(table(records, reference, metric="final_test_loss"))
    if args.records:
        write_jsonl(args.records, records)
        # What the records were measured with, beside them: provenance.json for records.jsonl
        # (the benchmarks' layout, as eval_report's), else <stem>.provenance.json, so that
        # records of several runs in one directory each keep their own.
        path = Path(args.records)
        name = "provenance.json" if path.name == "records.jsonl" else f"{path.stem}.provenance.json"
        made = provenance()
        if sys.argv[1:2] == ["eval"]:  # run as `learned-opt eval ...`
            made["command"] = shlex.join(["learned-opt", *sys.argv[1:]])
        (path.parent / name).write_text(json.dumps(made, indent=2) + "\n")
        print(f"\nwrote {args.records} and {path.parent / name}", file=sys.stderr)
    if args.plot:
        plot_curves(records, args.plot, title=f"{args.family}, {args.steps} steps")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def eval_report(out: str | Path, eval_args: list[str], title: str, command: str) -> int:
    """``learned-opt eval`` with ``eval_args``, its outputs in the directory ``out``:
    ``records.jsonl``, ``provenance.json`` (written with the records: the command, commit,
    torch, CPU, cores and threads), ``curves.png`` and ``table.md`` (``title``, the ``command``
    that ran, the commit and machine, then the mean final training and held-out losses per
    optimizer with their ratios to the first baseline). Returns the command's exit code."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = ["--records", str(out / "records.jsonl"), "--plot", str(out / "curves.png")]
    code = main(["eval", *eval_args, *files])
    if code:
        return code
    records = read_jsonl(out / "records.jsonl")
    reference = records[0]["optimizer"]  # the first baseline runs first
    (out / "table.md").write_text(
        f"# {title}\n\n"
        f"Command: `{command}`  \n"
        f"Commit: {git_commit()}; torch {torch.__version__}; {platform.machine()}"
        f", {torch.get_num_threads()} threads\n\n"
        "Final loss on the whole training set:\n\n"
        + table(records, reference)
        + "\n\nFinal loss on held-out data:\n\n"
        + table(records, reference, metric="final_test_loss")
        + "\n"
    )
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
    if error := _weights_path_error(args.out):
        return _usage_error("export", error)
    try:
        state = safe_load(args.checkpoint)
        if not isinstance(state, dict) or "best_rule" not in state:
            what = (
                "a meta-trainer checkpoint of a learner without an update rule (nothing to export)"
                if isinstance(state, dict) and "best_learner" in state
                else "not a meta-trainer checkpoint"
            )
            raise CheckpointError(f"{args.checkpoint} is {what}")
        rule, meta = load_rule(args.checkpoint, which=args.which)
    except CheckpointError as exc:
        return _usage_error("export", str(exc))
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
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out} and {meta_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
