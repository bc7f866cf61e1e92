"""Recipe of the shipped default weights, ``general``: meta-train, export, benchmark, ship.

    python experiments/general.py                  # the whole recipe, on CPUs
    python experiments/general.py --dry-run        # print its commands, run nothing
    python experiments/general.py --steps benchmark,ship      # some of its steps

Run it from the repository root; everything it writes goes under ``--out`` (``runs/general``)
until the ship step.

The steps, in order:

1. ``meta-train``: ``learned-opt meta-train`` with the configuration below, under ``torchrun`` with
   two processes of one thread each: the general rule (an Adam step with a per-tensor
   hypergradient step size, corrected per coordinate by a 16-unit LSTM whose read-out starts at
   zero, i.e. the rule starts as its hand-designed part), meta-trained on the ``diverse-rescaled``
   task family with whole 200-500-step unrolls (gradient checkpointing) and a loss-averse
   meta-objective against the starting rule, for 40 minutes (``--time-budget 2400``). The
   shipped run reached meta-iteration 47 on a 2-core CPU; the number of meta-iterations within
   the budget depends on the machine.
2. ``export``: ``learned-opt export`` of the newest checkpoint's rule (``--which latest``: the
   held-out ``val-ood`` metric never improved on the starting rule, so "best" would export the
   untrained rule).
3. ``benchmark``: ``benchmarks/ood.py`` on five seed streams at 100 steps (20 seeds, Adam's
   learning rate tuned on 3 others) and at 1,000 steps (8 seeds, 2 tuning seeds).
4. ``ship``: copies the weights into ``learned_opt/pretrained/general.pt`` with metadata (the
   meta-training command and commit, the budget, this recipe, and every ratio read from the
   benchmark tables), refuses weights with any ratio above 1 or tables that benchmarked other
   weights, and copies each table and its records into ``benchmarks/results/ood-general/``.

Each command is also recorded in the weights' metadata (``learned_opt.pretrained.metadata``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from learned_opt import load_rule, pretrained, save_rule
from learned_opt.cli import git_commit

NAME = "general"
ROOT = Path(__file__).resolve().parents[1]
RECIPE = "python experiments/general.py"

#: The general rule as shipped: every option of the hand-designed part, and a 16-unit LSTM.
RULE_KWARGS: dict[str, Any] = {
    "hidden_size": 16,
    "num_layers": 1,
    "lr": 0.01,
    "lr_adapt": 0.1,
    "lr_adapt_bound": 6.907755278982137,  # log(1000): the step size moves at most 1000x
    "lr_adapt_warmup": 5.0,
    "lr_adapt_warmup_steps": 20.0,
    "lr_adapt_shrink": 3.0,
    "lr_adapt_margin": 0.2,
    "grad_clip": 2.0,
    "lr_adapt_slowdown": 30.0,
    "lr_adapt_slowdown_rate": 0.3,
    "grad_clip_warmup": 3.0,
    "additive": False,
    "a_bound": 1.0,
    "learn_lr": False,
}

#: ``learned-opt meta-train`` options (the output directories are added by the recipe).
META_TRAIN = [
    "--family", "diverse-rescaled", "--rule", "general-lstm",
    "--rule-kwargs", json.dumps(RULE_KWARGS),
    "--horizon", "500", "--min-horizon", "200", "--truncation", "500", "--grad-checkpoint",
    "--objective", "train", "--log-meta-loss", "--loss-aversion", "3",
    "--meta-lr", "3e-3", "--meta-batch", "4", "--clip-grad", "1.0",
    "--iterations", "100000", "--time-budget", "2400",
    "--eval-every", "20", "--eval-tasks", "8", "--eval-family", "val-ood", "--eval-horizon", "500",
    "--checkpoint-every", "5",
]  # fmt: skip

#: Meta-training processes (data-parallel over the meta-batch) and their environment: one
#: thread each, and large allocations in their own mappings, so that memory freed by gradient
#: checkpointing goes back to the system.
PROCESSES = 2
ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}

#: ``benchmarks/ood.py`` runs: (steps, evaluation seeds, tuning seeds), each on these streams.
BENCHMARKS = [(100, 20, 3), (1000, 8, 2)]
STREAMS = range(5)

#: A tiny version of every step, for tests (seconds; one process; nothing goes into the package
#: unless --ship-to says where).
SMOKE_META_TRAIN = [
    "--family", "digits", "--rule", "general-lstm", "--rule-kwargs",
    json.dumps({**RULE_KWARGS, "hidden_size": 2}),
    "--horizon", "4", "--truncation", "4", "--objective", "train", "--log-meta-loss",
    "--meta-batch", "1", "--iterations", "2", "--eval-every", "0", "--checkpoint-every", "1",
]  # fmt: skip

STEPS = ("meta-train", "export", "benchmark", "ship")


def meta_train_command(out: Path, smoke: bool = False) -> list[str]:
    """The ``learned-opt`` arguments of the meta-training step (as the run records them)."""
    return [
        "meta-train",
        *(SMOKE_META_TRAIN if smoke else META_TRAIN),
        "--log-dir", str(out / "tb"), "--ckpt-dir", str(out / "ckpt"),
        "--export", str(out / "weights.pt"), "--resume", "--quiet",
    ]  # fmt: skip


def benchmark_dir(out: Path, steps: int, stream: int) -> Path:
    return out / "ood" / f"{steps}-stream{stream}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------ ship


def _section(text: str, title: str) -> list[list[str]]:
    """Rows (cells) of the markdown table under ``## title``."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if match is None:
        raise ValueError(f"no section {title!r}")
    rows = [line for line in match.group(1).splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]  # skip header


def read_table(directory: Path, label: str) -> list[dict[str, Any]]:
    """The figures of one ``benchmarks/ood.py`` run for the weights labelled ``label``, one
    entry per horizon in it: per task the ratio of final training loss to tuned Adam's (rounded
    to 3 decimals, as in the table), the geometric mean and the seeds won."""
    text = (directory / "table.md").read_text()
    command = re.search(r"^Command: `(.*)`", text, re.M)
    commit = re.search(r"^Commit: ([^;\s]+)", text, re.M)
    header = re.search(r"^\| task \| steps \| Adam lr \| Adam final loss \|(.*)\|$", text, re.M)
    if command is None or commit is None or header is None:
        raise ValueError(f"{directory}/table.md is not a benchmarks/ood.py table")
    labels = [c.strip() for c in header.group(1).split("|")]
    if label not in labels:
        raise ValueError(f"{directory} has no column {label!r} (columns: {labels})")
    col = labels.index(label)
    seed = re.search(r"--seed (\d+)", command.group(1))
    runs: dict[int, dict[str, Any]] = {}
    for cells in _section(text, "Final training loss (whole training set)"):
        if cells[0] == "**geometric mean**":
            runs[int(cells[1])]["geometric_mean"] = float(cells[4 + col].strip("*"))
        elif not cells[0].startswith("**") and cells[0] != "worst task":
            run = runs.setdefault(
                int(cells[1]),
                {
                    "results": str(directory),
                    "command": command.group(1),
                    "commit": commit.group(1),
                    "steps": int(cells[1]),
                    "seed_stream": int(seed.group(1)) if seed else 0,
                    "ratios": {},
                    "seeds_won": {},
                },
            )
            run["ratios"][cells[0]] = float(cells[4 + col])
    seeds_won = "Seeds won (final training loss below tuned Adam's on the same task seed)"
    for cells in _section(text, seeds_won):
        if not cells[0].startswith("**"):
            runs[int(cells[1])]["seeds_won"][cells[0]] = cells[2 + col]
    for run in runs.values():
        run["worst"] = max(run["ratios"].values())
        won = [tuple(map(int, w.split("/"))) for w in run["seeds_won"].values()]
        run["seeds_won"]["all"] = f"{sum(w for w, _ in won)}/{sum(n for _, n in won)}"
    return list(runs.values())


def _benchmarked_file(run: dict[str, Any], label: str) -> str | None:
    match = re.search(rf"--weights \S*?\b{re.escape(label)}=(\S+?)(?:,|\s|$)", run["command"])
    return match.group(1) if match else None


def ship(
    weights: Path,
    benchmarks: list[Path],
    *,
    dest: Path,
    results_to: Path | None,
    allow_above_one: bool = False,
) -> dict[str, Any]:
    """Write ``weights`` as ``dest/general.pt`` (and ``.json``) with the figures of the
    ``benchmarks/ood.py`` directories ``benchmarks``; copy their tables and records to
    ``results_to``. Returns the metadata.

    Raises:
        ValueError: weights without a meta-training record, tables of other weights, or (unless
            ``allow_above_one``) a ratio above 1. Nothing is written then.
    """
    rule, meta = load_rule(weights)
    if "all_commands" not in meta or "config" not in meta:
        raise ValueError(f"{weights} does not come from a meta-training run (no commands/config)")
    label, digest = weights.stem, _sha256(weights)
    runs = [run for d in benchmarks for run in read_table(d, label)]
    for run in runs:
        file = _benchmarked_file(run, label)
        if file is None:
            raise ValueError(f"{run['results']}: cannot tell which file {label!r} was")
        if not Path(file).is_file() or _sha256(Path(file)) != digest:
            raise ValueError(f"{run['results']} benchmarked {file}, not {weights}")
    worst = max(r["worst"] for r in runs)
    if worst > 1.0 and not allow_above_one:
        raise ValueError(f"a ratio above 1 ({worst:.3f}); not shipping")
    if results_to is not None:
        for run in runs:
            source = Path(run["results"])
            kept = results_to / source.name
            kept.mkdir(parents=True, exist_ok=True)
            for name in ("table.md", "records.jsonl"):
                shutil.copyfile(source / name, kept / name)
            run["results"] = os.path.relpath(kept, ROOT) if kept.is_relative_to(ROOT) else str(kept)
    by_steps: dict[str, Any] = {}
    for run in sorted(runs, key=lambda r: (r["steps"], r["seed_stream"])):
        by_steps.setdefault(str(run["steps"]), {"streams": []})["streams"].append(run)
    for entry in by_steps.values():
        entry["worst"] = max(r["worst"] for r in entry["streams"])
        entry["worst_geometric_mean"] = max(r["geometric_mean"] for r in entry["streams"])
    first, exported = meta["all_commands"][0], meta.get("exported", {})
    meta.update(
        command=first["command"],
        commit=first["commit"],
        recipe=RECIPE,
        budget={
            "iterations": exported.get("checkpoint_iteration", meta.get("iteration")),
            "meta_train_seconds": exported.get("meta_train_seconds"),
            "processes": meta.get("budget", {}).get("processes", PROCESSES),
            "torch_threads": 1,
        },
        figures={
            "benchmark": "benchmarks/ood.py: final training loss / tuned Adam's, per task",
            "worst_ratio": worst,
            "by_steps": by_steps,
        },
        weights_sha256=digest,
        shipped={"from": str(weights), "command": f"{RECIPE} --steps ship", "commit": git_commit()},
    )
    dest.mkdir(parents=True, exist_ok=True)
    save_rule(dest / f"{NAME}.pt", rule, meta)
    (dest / f"{NAME}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# ---------------------------------------------------------------------------------- recipe


def _show(argv: list[str], env: dict[str, str] | None = None) -> str:
    """``argv`` as a shell line (``python`` for this interpreter)."""
    prefix = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    argv = ["python" if a == sys.executable else a for a in argv]
    return (prefix + " " if prefix else "") + shlex.join(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/general"), help="run directory")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma list of " + ",".join(STEPS))
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--results-to", type=Path, default=ROOT / "benchmarks/results/ood-general")
    parser.add_argument("--allow-above-one", action="store_true", help="ship even so")
    parser.add_argument("--smoke", action="store_true", help="a tiny run of every step (tests)")
    # where ship writes: the package by default; tests ship into a temporary directory
    parser.add_argument("--ship-to", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if unknown := sorted(set(steps) - set(STEPS)):
        parser.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    if args.smoke and args.ship_to is None and "ship" in steps:
        parser.error("--smoke ships only into --ship-to")
    out, python = args.out, sys.executable
    weights = out / f"{NAME}.pt"

    def run(cmd: list[str], env: dict[str, str] | None = None, shown: str | None = None) -> None:
        print(shown or _show(cmd, env), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True, env={**os.environ, **(env or {})})

    if "meta-train" in steps:
        cli = meta_train_command(out, smoke=args.smoke)
        print(f"# meta-train; it records itself as: learned-opt {shlex.join(cli)}")
        if args.smoke:
            run([python, "-m", "learned_opt", *cli])
        else:
            launcher = ["-m", "torch.distributed.run", "--standalone"]
            run([python, *launcher, f"--nproc_per_node={PROCESSES}", "-m", "learned_opt", *cli],
                ENV)  # fmt: skip
    if "export" in steps:
        checkpoints = sorted((out / "ckpt").glob("ckpt_*.pt"))  # zero-padded iterations
        cmd = [python, "-m", "learned_opt", "export", "NEWEST", str(weights), "--which", "latest"]
        newest = f'"$(ls {shlex.quote(str(out / "ckpt"))}/ckpt_*.pt | tail -n 1)"'
        if checkpoints:
            cmd[4] = newest = str(checkpoints[-1])
        run(cmd, shown=_show(cmd).replace("NEWEST", newest))
    benchmarks = []
    if "benchmark" in steps or "ship" in steps:
        plan = [(3, 1, 1)] if args.smoke else BENCHMARKS
        for n_steps, seeds, tune_seeds in plan:
            for stream in [0] if args.smoke else STREAMS:
                bench = benchmark_dir(out, n_steps, stream)
                benchmarks.append(bench)
                if "benchmark" not in steps:
                    continue
                script = os.path.relpath(ROOT / "benchmarks" / "ood.py")
                cmd = [python, script, "--weights", f"{NAME}={weights}"]
                if args.smoke:
                    cmd += ["--smoke", "--tasks", "wine-mlp-tanh-32"]
                else:
                    cmd += ["--steps", str(n_steps), "--seeds", str(seeds)]
                    cmd += ["--tune-seeds", str(tune_seeds), "--seed", str(stream)]
                run([*cmd, "--out", str(bench)], {"OMP_NUM_THREADS": "1"})
    if "ship" in steps:
        dest = args.ship_to or Path(pretrained.__file__).parent
        print(f"# ship {weights} as {NAME!r} into {os.path.relpath(dest)}; tables and records "
              f"into {os.path.relpath(args.results_to)}")  # fmt: skip
        if args.dry_run:
            return 0
        try:
            meta = ship(
                weights,
                benchmarks,
                dest=dest,
                results_to=args.results_to,
                allow_above_one=args.allow_above_one or args.smoke,
            )
        except ValueError as exc:
            parser.error(str(exc))
        for n_steps, entry in meta["figures"]["by_steps"].items():
            gms = ", ".join(f"{r['geometric_mean']:.3f}" for r in entry["streams"])
            print(f"  {n_steps} steps: worst ratio {entry['worst']:.3f}, geometric means {gms}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
