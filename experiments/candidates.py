"""The steps shared by the recipes of candidates for the default weights: write the starting
weights, meta-train (resuming, from the committed checkpoint on a fresh machine), run the sealed
test once (:func:`run_steps`); and the steps of recipes that choose settings of shipped weights on
validation tasks (:func:`run_settings_steps`)."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("init", "meta-train", "sealed")
#: Where the sealed test's runs are committed.
SEALED = Path("benchmarks/results/sealed")
#: One thread per process; glibc's mmap threshold fixed (a large unroll's memory is returned).
ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", default=",".join(STEPS), help="comma list of " + ",".join(STEPS))
    parser.add_argument("--procs", type=int, default=1, help="meta-training processes (torchrun)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")


def main(description: str, argv: Sequence[str] | None, **steps: Any) -> int:
    """A recipe's command line with only the shared options: :func:`run_steps` with ``steps``
    (its keyword arguments)."""
    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser)
    return run_steps(parser.parse_args(argv), parser, **steps)


def sealed_command(run: Path, name: str) -> Callable[[int], list[str]]:
    """The sealed test of ``run``'s exported weights per horizon, into
    ``benchmarks/results/sealed/{name}-{steps}``."""

    def command(steps: int) -> list[str]:
        return [
            "benchmarks/sealed.py", "--weights", str(run / "weights.pt"), "--steps", str(steps),
            "--out", f"benchmarks/results/sealed/{name}-{steps}",
        ]  # fmt: skip

    return command


def export_best(run: Path, checkpoint: Path | None = None) -> list[str]:
    """The command (after ``python``) exporting the best weights of ``checkpoint`` (default:
    ``run``'s latest) to ``run/weights.pt``."""
    if checkpoint is None:
        default = run / "ckpt" / "ckpt_<latest>.pt"
        checkpoint = max((run / "ckpt").glob("ckpt_*.pt"), default=default)
    return [
        "-m", "learned_opt", "export", str(checkpoint), str(run / "weights.pt"), "--which", "best",
    ]  # fmt: skip


def restore_checkpoint(run: Path, checkpoint: Path) -> None:
    """Put the committed ``checkpoint`` where ``--resume`` looks (``run/ckpt``), unless the run
    has newer ones."""
    ckpt_dir = run / "ckpt"
    if checkpoint.is_file() and not any(ckpt_dir.glob("ckpt_*.pt")):
        import torch

        iteration = int(torch.load(checkpoint, weights_only=True)["iteration"])
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(checkpoint, ckpt_dir / f"ckpt_{iteration:08d}.pt")


def run_steps(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    *,
    run: Path,
    checkpoint: Path,
    write_init: Callable[[Path], None],
    meta_train: Sequence[str],
    sealed: Callable[[int], Sequence[str]],
) -> int:
    """Run the ``--steps`` of a candidate whose run folder is ``run``: ``write_init`` writes
    ``run/init.pt``; ``meta_train`` is the command after ``python -m learned_opt``; ``sealed``
    gives the sealed test's command (after ``python``) per horizon."""
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if unknown := sorted(set(steps) - set(STEPS)):
        parser.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    if args.procs < 1 or 4 % args.procs:
        parser.error("--procs must divide the meta-batch, 4")
    if Path.cwd().resolve() != ROOT and not args.dry_run:
        parser.error(f"run it from the repository root ({ROOT}): its paths are relative to it")
    if "init" in steps:
        print(f"# init: {run / 'init.pt'}", flush=True)
        if not args.dry_run:
            write_init(run / "init.pt")
    if "meta-train" in steps:
        launch = ["-m", "learned_opt"]
        if args.procs > 1:
            launch = ["-m", "torch.distributed.run", "--standalone"]
            launch += [f"--nproc_per_node={args.procs}", "-m", "learned_opt"]
        command = [*launch, *meta_train]
        print(shlex.join(["python", *command]), flush=True)
        if not args.dry_run:
            restore_checkpoint(run, checkpoint)
            env = {**os.environ, **ENV}
            subprocess.run([sys.executable, *command], check=True, env=env)
    if "sealed" in steps:
        for horizon in (100, 1000):
            command = list(sealed(horizon))
            print(shlex.join(["python", *command]), flush=True)
            if not args.dry_run:
                subprocess.run([sys.executable, *command], check=True)
    return 0


#: The horizons of the validation and sealed runs.
HORIZONS = (100, 1000)


def validation_command(run: Path, steps: int, out: Path) -> list[str]:
    """The validation run (after ``python``) of ``run/weights.pt`` and of the same weights
    with their learned outputs zeroed, told the horizon, at ``steps``, into ``out/{steps}``."""
    return [
        "benchmarks/sealed.py", "--group", "validation", "--total-steps",
        "--weights", str(run / "weights.pt"), "--optimizers", "learned,learned-zeroed",
        "--steps", str(steps), "--out", str(out / f"{steps}"),
    ]  # fmt: skip


def validation_figures(out: Path) -> dict[int, dict[str, float]]:
    """Per horizon, the geometric means over the validation group of the final-loss ratios to
    tuned Adam of the weights (``learned``) and of their learned outputs zeroed
    (``learned-zeroed``), read from :func:`validation_command`'s runs."""
    from learned_opt.evaluate import geometric_mean
    from learned_opt.report import read_jsonl

    found: dict[int, dict[str, float]] = {}
    for steps in HORIZONS:
        rows = [r for r in read_jsonl(out / f"{steps}" / "summary.jsonl") if r["kind"] == "summary"]
        found[steps] = {
            o: geometric_mean([r["ratio_train"] for r in rows if r["optimizer"] == o])
            for o in ("learned", "learned-zeroed")
        }
    return found


def validate_against_zeroed(
    out: Path, run: Path, label: str, description: str, zeroed_label: str
) -> dict[int, dict[str, float]]:
    """:func:`validation_command` at both horizons side by side (one process each); writes
    ``out/table.md`` (rows ``label`` and ``zeroed_label``, under ``description``) and returns
    :func:`validation_figures`."""
    from concurrent.futures import ThreadPoolExecutor

    from learned_opt.report import write_results

    out.mkdir(parents=True, exist_ok=True)

    def one(steps: int) -> None:
        command = [sys.executable, *validation_command(run, steps, out)]
        with (out / f"{steps}.log").open("w") as f:
            subprocess.run(command, check=True, stdout=f, stderr=subprocess.STDOUT)

    with ThreadPoolExecutor(len(HORIZONS)) as pool:
        list(pool.map(one, HORIZONS))
    found = validation_figures(out)
    lines = [
        f"{description} (`{run}/weights.pt`, the best weights on the meta-trainer's held-out "
        "tasks) against the same rule with its learned outputs zeroed, on the validation group "
        "(5 members x 5 seeds; geometric mean of the final training loss / tuned Adam's; the "
        "horizon told):",
        "",
        "| rule | " + " | ".join(f"{h} steps" for h in HORIZONS) + " |",
        "| --- | " + " | ".join("---:" for _ in HORIZONS) + " |",
    ]
    for name, key in ((label, "learned"), (zeroed_label, "learned-zeroed")):
        lines.append(f"| {name} | " + " | ".join(f"{found[h][key]:.3f}" for h in HORIZONS) + " |")
    write_results(out, [{"steps": h, **found[h]} for h in HORIZONS], lines)
    print("\n".join(lines), flush=True)
    return found


def validate_settings(
    base: str,
    grid: Sequence[dict[str, Any]],
    horizons: Sequence[int],
    out: Path,
    caption: str,
) -> dict[str, Any]:
    """The shipped weights ``base`` with each setting of ``grid`` (``{}``, the first: as
    shipped) on the validation group's 8 held-out tasks (the meta-trainer's evaluation seeds;
    final training loss, geometric mean over the tasks) at each of ``horizons``; writes ``out``
    (``table.md`` under ``caption``, ``records.jsonl``); returns the setting with the lowest
    mean log metric over the horizons."""
    import torch

    from learned_opt import LearnedOptimizer, load_rule, pretrained
    from learned_opt.evaluate import run_optimizer
    from learned_opt.outer.config import MetaTrainConfig
    from learned_opt.outer.held_out import HeldOut
    from learned_opt.report import write_results
    from learned_opt.tasks import make_family

    torch.set_num_threads(1)
    rule, _ = load_rule(pretrained.path(base))
    records = []
    for horizon in horizons:
        config = MetaTrainConfig(
            objective="final-train", log_meta_loss=True, eval_family="validation",
            eval_tasks=8, eval_horizon=horizon,
        )  # fmt: skip
        held = HeldOut(config, make_family("validation"))
        for changes in grid:
            variant = rule.variant(**changes) if changes else rule
            start = time.perf_counter()

            def factory(params, lr, rule=variant):
                return LearnedOptimizer(params, rule, lr=lr)

            runs = [run_optimizer(held.family, s, factory, 1.0, horizon) for s in held.seeds]
            losses = [getattr(r, held.metric_name) for r in runs]
            records.append({"setting": changes, "steps": horizon, "losses": losses,
                            "metric": held.aggregate(losses),
                            "seconds": time.perf_counter() - start})  # fmt: skip
            print(f"{horizon} steps {json.dumps(changes)}: {records[-1]['metric']:.4f}", flush=True)
    metric = {(json.dumps(r["setting"]), r["steps"]): r["metric"] for r in records}

    def score(changes: dict[str, Any]) -> float:
        key = json.dumps(changes)
        return sum(math.log(metric[key, h] / metric["{}", h]) for h in horizons) / len(horizons)

    chosen = min(grid, key=score)
    lines = [
        caption,
        "",
        "| setting | " + " | ".join(f"{h} steps" for h in horizons) + " | mean / shipped |",
        "| --- | " + " | ".join("---:" for _ in horizons) + " | ---: |",
    ]
    for changes in grid:
        key = json.dumps(changes)
        cells = " | ".join(f"{metric[key, h]:.4f}" for h in horizons)
        mark = " (chosen)" if changes == chosen else ""
        lines.append(f"| `{key}`{mark} | {cells} | {math.exp(score(changes)):.3f} |")
    write_results(out, records, lines)
    return chosen


def sealed_figures(directory: Path) -> dict[str, Any]:
    """The figures of one ``benchmarks/sealed.py`` run (its ``summary.jsonl``): for the learned
    optimizer and each other optimizer, the geometric mean over the tasks of the final training
    loss / tuned constant Adam's, the worst task and the seeds won; the learned optimizer's ratio
    per task."""
    from learned_opt.evaluate import geometric_mean
    from learned_opt.report import read_jsonl

    rows = read_jsonl(directory / "summary.jsonl")
    (meta,) = [r for r in rows if r["kind"] == "meta"]
    rows = [r for r in rows if r["kind"] == "summary" and r["optimizer"] != "adam"]
    optimizers: dict[str, dict[str, Any]] = {}
    for name in sorted({r["optimizer"] for r in rows}):
        mine = [r for r in rows if r["optimizer"] == name]
        ratios = [r["ratio_train"] for r in mine]
        optimizers[name] = {
            "geometric_mean": round(geometric_mean(ratios), 4),
            "worst": round(max(ratios), 4),
            "seeds_won": f"{sum(r['won'] for r in mine)}/{sum(r['seeds'] for r in mine)}",
        }
    (steps,) = {r["steps"] for r in rows}
    learned = {r["task"]: round(r["ratio_train"], 4) for r in rows if r["optimizer"] == "learned"}
    return {
        "results": str(directory),
        "command": meta["command"],
        "commit": meta["commit"],
        "steps": steps,
        **optimizers["learned"],
        "ratios": learned,
        "optimizers": optimizers,
    }


def sealed_comparison(
    sealed: Path,
    name: str,
    replaces: str,
    horizons: Sequence[int],
    *,
    benchmark: str,
    replaced_name: str | None = None,
) -> dict[str, Any]:
    """The ``figures`` recorded with shipped weights: their sealed runs (``sealed/{name}-{h}``)
    per horizon beside those of the weights ``replaces`` (``sealed/{replaced_name}-{h}``, by
    default ``replaces``'s name), the worst task and whether they are a default candidate."""
    by_steps = {
        str(h): {
            **sealed_figures(sealed / f"{name}-{h}"),
            f"replaced_{replaces}": sealed_figures(sealed / f"{replaced_name or replaces}-{h}"),
        }
        for h in horizons
    }
    return {
        "benchmark": benchmark,
        "worst_ratio": max(entry["worst"] for entry in by_steps.values()),
        "by_steps": by_steps,
        # at most the replaced weights' at every horizon: the condition for the default
        "default_candidate": all(
            entry["geometric_mean"] <= entry[f"replaced_{replaces}"]["geometric_mean"]
            for entry in by_steps.values()
        ),
    }


#: The sealed benchmark's figures told the horizon (``--total-steps``).
TOLD_HORIZON = (
    "benchmarks/sealed.py --total-steps: mean final training loss / tuned constant Adam's per "
    "task; geometric mean over the sealed test group's tasks"
)


#: The meta-trainer's held-out metric of the learned-part runs (``--eval-horizon 500``).
HELD_OUT_TOLD = (
    "the meta-trainer's eval/metric: geometric mean of the final training loss over the "
    "validation group's 8 held-out tasks at 500 steps, the horizon told"
)
#: The same with ``--eval-untold``: each task run told the horizon and not.
HELD_OUT_TOLD_AND_UNTOLD = (
    "the meta-trainer's eval/metric: geometric mean of the final training loss over the "
    "validation group's 8 held-out tasks at 500 steps, each run told the horizon and not (16 "
    "runs)"
)


def ship_learned_part(
    dest: Path,
    *,
    name: str,
    shipped: str,
    base: str,
    base_sealed: str,
    base_sealed_free: str,
    checkpoint: Path,
    sealed_dir: Path,
    source: str,
    recipe: str,
    settings: dict[str, Any],
    start: str,
    metric: str = HELD_OUT_TOLD,
) -> dict[str, Any]:
    """Write the best weights of the committed ``checkpoint`` of a candidate that learned a part
    of the shipped ``base`` weights as ``dest/{shipped}.pt`` (and ``.json``), with their
    provenance, budget, validation metric and sealed figures (``sealed_dir/{name}-{h}``, told
    the horizon; ``{name}-horizon-free-{h}``, not) beside ``base``'s (``base_sealed``,
    ``base_sealed_free``); returns the metadata. ``source``: what the weights are; ``recipe``:
    the script; ``settings``: what the candidate changed in ``base``'s configuration;
    ``start``: the name under which the validation metric of the starting rule is recorded;
    ``metric``: what that metric is (the run's held-out evaluation).

    Raises:
        ValueError: their sealed geometric mean (told the horizon, or not) is above ``base``'s
            at some horizon; nothing is written then.
    """
    import torch

    import learned_opt
    from learned_opt import load_rule, save_rule
    from learned_opt.cli import git_commit

    rule, meta = load_rule(checkpoint, which="best")
    state = torch.load(checkpoint, weights_only=True)
    figures = sealed_comparison(
        sealed_dir, name, base, HORIZONS, replaced_name=base_sealed, benchmark=TOLD_HORIZON
    )
    free = sealed_comparison(
        sealed_dir, f"{name}-horizon-free", base, HORIZONS, replaced_name=base_sealed_free,
        benchmark="benchmarks/sealed.py (not told the horizon), as above",
    )  # fmt: skip
    for told, found in (("told the horizon", figures), ("not told", free)):
        for horizon, entry in found["by_steps"].items():
            before = entry[f"replaced_{base}"]["geometric_mean"]
            if entry["geometric_mean"] > before:
                raise ValueError(
                    f"{horizon} steps, {told}: sealed geometric mean {entry['geometric_mean']} "
                    f"is above {base!r}'s {before}; not shipping"
                )
    history = state.get("history", {})
    commands = (state.get("notes") or {}).get("commands", [])
    meta.update(
        command=commands[-1]["command"] if commands else None,
        commit=commands[-1]["commit"] if commands else None,
    )
    meta.update(
        source=source,
        recipe=f"python {recipe}",
        checkpoint={"file": str(checkpoint), "iteration": state["iteration"],
                    "best_iteration": state["best_iteration"],
                    "best_metric": state["best_metric"]},
        all_commands=commands,
        eval_history=history,
        derived_from={
            "weights": base,
            "weights_sha256": hashlib.sha256(
                learned_opt.pretrained.path(base).read_bytes()
            ).hexdigest(),
            "settings": settings,
        },
        budget={
            "iterations": state["iteration"],
            "meta_train_seconds": round(float(state["elapsed"]), 1),
            "processes": 2,
            "torch_threads": 1,
        },
        validation={
            "metric": metric,
            start: history.get("eval_metric", [None])[0],
            "best": state["best_metric"],
        },
        figures={**figures, "horizon_free": free},
        shipped={"command": f"python {recipe} --steps ship", "commit": git_commit()},
    )  # fmt: skip
    dest.mkdir(parents=True, exist_ok=True)
    save_rule(dest / f"{shipped}.pt", rule, meta)
    (dest / f"{shipped}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def learned_part_main(
    argv: Sequence[str] | None,
    description: str,
    *,
    ship: Callable[[Path], Any],
    shipped: str,
    run: Path,
    checkpoint: Path,
    validation: Path,
    validation_labels: tuple[str, str, str],
    write_init: Callable[[Path], None],
    meta_train: Sequence[str],
    name: str,
) -> int:
    """The command line of a candidate that learns a part of shipped weights: the
    :data:`STEPS` (:func:`run_steps`) and ``validate`` (:func:`validate_against_zeroed` with
    ``validation_labels``: label, description, zeroed label), ``weights`` (the committed
    ``checkpoint``'s best weights to ``run/weights.pt``) and ``ship`` (``ship(dest)``, into
    the package)."""
    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser)
    # where ship writes: the package by default; tests ship into a temporary directory
    parser.add_argument("--ship-to", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if "ship" in steps:
        print(f"# ship: {shipped} from the best weights of {checkpoint}", flush=True)
        if not args.dry_run:
            import learned_opt

            try:
                ship(args.ship_to or Path(learned_opt.pretrained.__file__).parent)
            except ValueError as exc:  # weights above the shipped ones' sealed figures
                parser.exit(2, f"{parser.prog}: not shipped: {exc}\n")
        steps.remove("ship")
        if not steps:
            return 0
    for step, source in (("validate", None), ("weights", checkpoint)):
        if step in steps:
            command = export_best(run, source)
            print(shlex.join(["python", *command]), flush=True)
            if not args.dry_run:
                subprocess.run([sys.executable, *command], check=True)
                if step == "validate":
                    validate_against_zeroed(validation, run, *validation_labels)
    shared = [s for s in steps if s not in ("validate", "weights")]
    if shared or not steps:
        args.steps = ",".join(shared)
        run_steps(
            args, parser, run=run, checkpoint=checkpoint, write_init=write_init,
            meta_train=meta_train, sealed=sealed_command(run, name),
        )  # fmt: skip
    return 0


def derived_command(
    command: Sequence[str],
    run: Path,
    new_run: Path,
    values: dict[str, str],
    flags: dict[str, Sequence[str]] | None = None,
) -> list[str]:
    """A meta-training ``command`` of ``run`` on ``new_run``'s folders, each option of ``values``
    given its new value, and the arguments ``flags[option]`` inserted after that option's value
    (e.g. ``{"--meta-lr": ["--meta-lr-schedule", "cosine"]}``)."""
    out = [arg.replace(str(run), str(new_run)) for arg in command]
    for option, value in values.items():
        out[out.index(option) + 1] = value
    for option, extra in (flags or {}).items():
        at = out.index(option) + 2
        out[at:at] = list(extra)
    return out


def with_new_part(start: Any, settings: dict[str, Any], added: Sequence[str]) -> Any:
    """The rule ``start`` (a :class:`~learned_opt.rules.ScheduledRule`) with ``settings`` changed
    in its base rule's configuration, holding ``start``'s weights; the weights the settings add
    (``added``, checked: nothing else is new, nothing is dropped) keep their initialization
    (zero: the rule steps as ``start``)."""
    from learned_opt.rules import build_rule

    config = start.config()
    config["base_config"] = {**config["base_config"], **settings}
    rule = build_rule(start.kind, config)
    missing, unexpected = rule.load_state_dict(start.state_dict(), strict=False)
    assert sorted(missing) == sorted(added) and not unexpected, (missing, unexpected)
    return rule


def write_start(path: Path, rule: Any, source: str) -> None:
    """Write a run's starting ``rule`` to ``path`` (its ``init`` step), ``source`` in words."""
    from learned_opt import save_rule

    path.parent.mkdir(parents=True, exist_ok=True)
    save_rule(path, rule, {"source": source})


@dataclass(frozen=True)
class LearnedPartRecipe:
    """A recipe that meta-trains a part of shipped weights (the learned adaptation's family):
    what it declares, and its :meth:`ship` step and :meth:`main` command line.

    Attributes:
        name: the run's name (``runs/{name}``, ``experiments/checkpoints/{name}.pt``, the
            sealed runs ``{name}-{steps}`` and ``{name}-horizon-free-{steps}``).
        script: the recipe's path from the repository root.
        description: its command line's description.
        shipped: the name its weights would ship under.
        base: the shipped weights it starts from; ``base_sealed``, ``base_sealed_free``: their
            sealed runs told the horizon and not (``ship`` refuses weights above them).
        source: what the weights are, in words (their metadata's ``source``).
        settings: what it changed in ``base``'s configuration or meta-training.
        start: the name of the starting rule's validation metric in the metadata.
        labels: the ``validate`` step's label, description and zeroed label.
        write_init: writes the starting weights to a path.
        meta_train: the meta-training command after ``python -m learned_opt``.
        metric: what the run's held-out metric is.
    """

    name: str
    script: str
    description: str
    shipped: str
    base: str
    base_sealed: str
    base_sealed_free: str
    source: str
    settings: dict[str, Any]
    start: str
    labels: tuple[str, str, str]
    write_init: Callable[[Path], None]
    meta_train: Sequence[str]
    metric: str = HELD_OUT_TOLD

    @property
    def run(self) -> Path:
        return Path("runs") / self.name

    @property
    def checkpoint(self) -> Path:
        return Path("experiments/checkpoints") / f"{self.name}.pt"

    @property
    def validation(self) -> Path:
        return Path("benchmarks/results/validation") / self.name

    def ship(
        self, dest: Path, sealed_dir: Path = SEALED, checkpoint: Path | None = None
    ) -> dict[str, Any]:
        """Write the best weights of the committed ``checkpoint`` (those sealed-tested) as
        ``dest/{shipped}.pt`` (and ``.json``) with their provenance and figures; returns the
        metadata (:func:`ship_learned_part`).

        Raises:
            ValueError: their sealed geometric mean (told the horizon, or not) is above
                ``base``'s at some horizon; nothing is written then.
        """
        return ship_learned_part(
            dest, name=self.name, shipped=self.shipped, base=self.base,
            base_sealed=self.base_sealed, base_sealed_free=self.base_sealed_free,
            checkpoint=checkpoint or self.checkpoint, sealed_dir=sealed_dir, source=self.source,
            recipe=self.script, settings=self.settings, start=self.start, metric=self.metric,
        )  # fmt: skip

    def main(self, argv: Sequence[str] | None = None) -> int:
        """The recipe's command line (:func:`learned_part_main`)."""
        return learned_part_main(
            argv, self.description, ship=self.ship, shipped=self.shipped, run=self.run,
            checkpoint=self.checkpoint, validation=self.validation,
            validation_labels=self.labels, write_init=self.write_init,
            meta_train=self.meta_train, name=self.name,
        )  # fmt: skip


def ship_settings(
    dest: Path,
    *,
    name: str,
    replaces: str,
    chosen: dict[str, Any],
    recipe: str,
    results: Path,
    sealed_name: str,
    horizons: Sequence[int],
    source: str,
    sealed: Path = SEALED,
    replaced_name: str | None = None,
    allow_worse: bool = False,
    validation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the shipped weights ``replaces`` with the settings ``chosen`` as ``dest/{name}.pt``
    (and ``.json``), with metadata: the meta-training record of the weights they derive from,
    the settings and the validation figures that chose them (``results/records.jsonl``, written
    by :func:`validate_settings` through the command ``{recipe} --steps validate``), and the
    sealed figures (``sealed/{sealed_name}-{steps}``) of these weights and of ``replaces``
    (``sealed/{replaced_name}-{steps}``, by default ``replaces``'s name). A recipe whose
    validation records differ passes its own ``validation`` figures. Returns the metadata.

    Raises:
        ValueError: (unless ``allow_worse``) their sealed geometric mean is above that of
            ``replaces`` at some horizon. Nothing is written then. With ``allow_worse`` (weights
            shipped by name beside the default) ``figures.default_candidate`` records whether
            it is at most that at every horizon.
    """
    from learned_opt import load_rule, pretrained
    from learned_opt.report import read_jsonl

    base, meta = load_rule(pretrained.path(replaces))
    figures = sealed_comparison(
        sealed, sealed_name, replaces, horizons, replaced_name=replaced_name,
        benchmark="benchmarks/sealed.py: mean final training loss / tuned constant Adam's per "
        "task; geometric mean over the sealed test group's tasks",
    )  # fmt: skip
    for horizon, entry in figures["by_steps"].items():
        before = entry[f"replaced_{replaces}"]
        if entry["geometric_mean"] > before["geometric_mean"] and not allow_worse:
            raise ValueError(
                f"{horizon} steps: sealed geometric mean {entry['geometric_mean']} is above "
                f"{replaces!r}'s {before['geometric_mean']}; not shipping"
            )
    if validation is None:
        rows = read_jsonl(results / "records.jsonl")
        metric = {(json.dumps(r["setting"]), r["steps"]): r["metric"] for r in rows}
        validation = {
            "command": f"{recipe} --steps validate",
            "results": str(results),
            "metric": "geometric mean of the final training loss over the validation group's 8 "
            "tasks",
            "by_steps": {
                str(h): {"chosen": round(metric[json.dumps(chosen), h], 4),
                         replaces: round(metric["{}", h], 4)}
                for h in horizons
            },
            "selection_seconds": round(sum(r["seconds"] for r in rows), 1),
        }  # fmt: skip
    return write_derived(
        dest, name, base.variant(**chosen), derived_from=replaces, base_meta=meta, source=source,
        settings=chosen, validation=validation, recipe=recipe, figures=figures,
    )  # fmt: skip


def write_derived(
    dest: Path,
    name: str,
    rule: Any,
    *,
    derived_from: str,
    base_meta: dict[str, Any],
    source: str,
    settings: dict[str, Any],
    validation: dict[str, Any],
    recipe: str,
    figures: dict[str, Any],
) -> dict[str, Any]:
    """Write ``rule`` as ``dest/{name}.pt`` (and ``.json``), shipped weights derived from the
    shipped ``derived_from`` (whose metadata ``base_meta`` it keeps, less what describes that
    file itself): the settings changed, the validation figures that chose them, the recipe,
    the selection's time added to the budget, the sealed ``figures`` and the commit. Returns
    the metadata."""
    from learned_opt import pretrained, save_rule
    from learned_opt.cli import git_commit

    drop = ("shipped", "figures", "weights_sha256")  # of the base file, not of these weights
    meta = {key: value for key, value in base_meta.items() if key not in drop}
    meta.update(
        source=source,
        derived_from={
            "weights": derived_from,
            "weights_sha256": hashlib.sha256(
                pretrained.path(derived_from).read_bytes()
            ).hexdigest(),
            "settings": settings,
            "chosen_on_validation": validation,
        },
        recipe=recipe,
        budget={**meta.get("budget", {}), "selection_seconds": validation["selection_seconds"]},
        figures=figures,
        shipped={"command": f"{recipe} --steps ship", "commit": git_commit()},
    )
    dest.mkdir(parents=True, exist_ok=True)
    save_rule(dest / f"{name}.pt", rule, meta)
    (dest / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def write_settings_weights(path: Path, base: str, chosen: dict[str, Any]) -> None:
    """Write the shipped ``base`` weights with the settings ``chosen`` as ``path`` (a settings
    recipe's ``weights`` step)."""
    from learned_opt import load_rule, pretrained, save_rule

    rule, _ = load_rule(pretrained.path(base))
    path.parent.mkdir(parents=True, exist_ok=True)
    source = f"the shipped {base!r} weights with {json.dumps(chosen)}, chosen on validation"
    save_rule(path, rule.variant(**chosen), {"source": source})


#: The steps of a recipe that chooses settings of shipped weights on validation tasks.
SETTINGS_STEPS = ("validate", "weights", "sealed", "ship")


def settings_parser(description: str) -> argparse.ArgumentParser:
    """The command line shared by settings recipes (``--steps`` of :data:`SETTINGS_STEPS`)."""
    parser = argparse.ArgumentParser(description=description)
    steps = ",".join(SETTINGS_STEPS)
    parser.add_argument("--steps", default=steps, help="comma list of " + steps)
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    # where ship writes: the package by default; tests ship into a temporary directory
    parser.add_argument("--ship-to", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def run_settings_steps(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    *,
    results: Path,
    run: Path,
    sealed_name: str,
    name: str,
    chosen: Any,
    validate: Callable[[], Any],
    write_weights: Callable[[Path], None],
    ship: Callable[[Path], Any],
    sealed_skip: Callable[[], str | None] | None = None,
) -> int:
    """Run the ``--steps`` of a settings recipe: ``validate()`` writes ``results`` and returns
    the setting it chooses (a note if it is not ``chosen``); ``write_weights`` writes
    ``run/weights.pt``; the sealed test of those weights into ``sealed_name``-{100,1000}
    (unless ``sealed_skip()`` returns why it is not needed); ``ship(dest)`` writes ``name``."""
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if unknown := sorted(set(steps) - set(SETTINGS_STEPS)):
        parser.error(f"unknown steps {unknown}; choose from {', '.join(SETTINGS_STEPS)}")
    if Path.cwd().resolve() != ROOT and not args.dry_run:
        parser.error(f"run it from the repository root ({ROOT})")
    if "validate" in steps:
        print(f"# validate: {results}", flush=True)
        if not args.dry_run and (now := validate()) != chosen:
            print(f"# the validation now chooses {now}, not CHOSEN {chosen}", flush=True)
    if "weights" in steps:
        print(f"# weights: {run / 'weights.pt'}", flush=True)
        if not args.dry_run:
            write_weights(run / "weights.pt")
    skip = sealed_skip() if "sealed" in steps and sealed_skip and not args.dry_run else None
    if skip:
        print(f"# sealed: {skip}", flush=True)
    elif "sealed" in steps:
        sealed = sealed_command(run, sealed_name)
        for horizon in (100, 1000):
            command = sealed(horizon)
            print(shlex.join(["python", *command]), flush=True)
            if not args.dry_run:
                subprocess.run([sys.executable, *command], check=True)
    if "ship" in steps:
        from learned_opt import pretrained

        dest = args.ship_to or Path(pretrained.__file__).parent
        print(f"# ship as {name!r} into {dest}", flush=True)
        if not args.dry_run:
            ship(dest)
    return 0


def settings_main(
    description: str,
    argv: Sequence[str] | None,
    *,
    base: str,
    chosen: dict[str, Any],
    validate: Callable[[], Any],
    ship: Callable[..., Any],
    **steps: Any,
) -> int:
    """The command line of a recipe that retunes settings of the shipped ``base`` weights
    (:func:`run_settings_steps`, its ``weights`` step :func:`write_settings_weights`):
    ``ship(dest, allow_worse=...)``; ``--allow-worse`` ships even if worse sealed."""
    parser = settings_parser(description)
    parser.add_argument("--allow-worse", action="store_true", help="ship even if worse sealed")
    args = parser.parse_args(argv)
    return run_settings_steps(
        args, parser, chosen=chosen, validate=validate,
        write_weights=lambda path: write_settings_weights(path, base, chosen),
        ship=lambda dest: ship(dest, allow_worse=args.allow_worse), **steps,
    )  # fmt: skip
