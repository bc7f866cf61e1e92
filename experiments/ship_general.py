"""Ship a meta-trained general rule as named weights inside the package, with its figures.

The weights file must come from ``learned-opt export`` (or ``--export``) of a meta-training run,
so its metadata names the meta-training command and commit. The figures are read from
``benchmarks/ood.py`` output directories run on those weights (their ``table.md``: per task the
ratio of the learned optimizer's final training loss to tuned Adam's, rounded to 3 decimals as
there, the geometric mean and the seeds won). The script refuses directories that benchmarked
other weights (the file named in the table must have the same SHA-256 as the weights shipped
or, when it no longer exists, the same file name) and, unless ``--allow-above-one``, weights
with any ratio above 1.

    python experiments/ship_general.py --weights experiments/results/general/session13/b1-it47.pt \
        --launch "bash experiments/results/general/session13/meta_train.sh b1" --processes 2 \
        --benchmarks benchmarks/results/ood-{100,1000}-b1-it47-seed*
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from learned_opt import pretrained  # noqa: E402
from learned_opt.checkpoint import load_rule, save_rule  # noqa: E402
from learned_opt.cli import git_commit  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _section(text: str, title: str) -> list[list[str]]:
    """Rows (cells) of the markdown table under ``## title``."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if match is None:
        raise ValueError(f"no section {title!r}")
    rows = [line for line in match.group(1).splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]  # skip header


def read_table(directory: Path, label: str) -> list[dict[str, Any]]:
    """The figures of one ``benchmarks/ood.py`` run for the weights labelled ``label``, one
    entry per horizon in it."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, type=Path, help="an exported weights file")
    parser.add_argument("--name", default="general", help="shipped name")
    parser.add_argument("--label", default=None, help="the weights' column in the tables")
    parser.add_argument("--launch", default=None, help="the command that launched the run")
    parser.add_argument("--processes", type=int, default=1, help="meta-training processes")
    parser.add_argument("--benchmarks", nargs="+", type=Path, required=True)
    parser.add_argument("--allow-above-one", action="store_true")
    # where it writes: the package by default; tests ship into a temporary directory
    parser.add_argument("--ship-to", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    rule, meta = load_rule(args.weights)
    if "all_commands" not in meta or "config" not in meta:
        parser.error(f"{args.weights} does not come from a meta-training run (no commands/config)")
    label = args.label or args.weights.stem
    digest = _sha256(args.weights)
    runs = [run for d in sorted(args.benchmarks) for run in read_table(d, label)]
    for run in runs:
        file = _benchmarked_file(run, label)
        if file is None:
            parser.error(f"{run['results']}: cannot tell which file {label!r} was")
        there = Path(file) if Path(file).is_absolute() else _ROOT / file
        if there.is_file():
            if _sha256(there) != digest:
                parser.error(f"{run['results']} benchmarked {file}, other weights")
        elif there.name != args.weights.name:
            parser.error(f"{run['results']} benchmarked {file}, not {args.weights}")
        else:  # runs/ is not kept: the name the export wrote is all there is to check
            print(f"note: {file} is gone; trusting its name for {run['results']}", file=sys.stderr)
    worst = max(r["worst"] for r in runs)
    if worst > 1.0 and not args.allow_above_one:
        parser.error(f"a ratio above 1 ({worst:.3f}); not shipping (--allow-above-one to force)")

    first = meta["all_commands"][0]
    exported = meta.get("exported", {})
    by_steps: dict[str, Any] = {}
    for run in runs:
        entry = by_steps.setdefault(str(run["steps"]), {"streams": []})
        entry["streams"].append(run)
    for entry in by_steps.values():
        entry["worst"] = max(r["worst"] for r in entry["streams"])
        entry["worst_geometric_mean"] = max(r["geometric_mean"] for r in entry["streams"])
    meta.update(
        command=first["command"],
        commit=first["commit"],
        launch=args.launch,
        budget={
            "iterations": exported.get("checkpoint_iteration", meta.get("iteration")),
            "meta_train_seconds": exported.get("meta_train_seconds"),
            "processes": args.processes,
            "torch_threads": 1,
        },
        figures={
            "benchmark": "benchmarks/ood.py: final training loss / tuned Adam's, per task",
            "worst_ratio": worst,
            "by_steps": by_steps,
        },
        weights_sha256=digest,
        shipped={
            "from": str(args.weights),
            "command": "python experiments/ship_general.py " + shlex.join(argv or sys.argv[1:]),
            "commit": git_commit(),
        },
    )
    dest = args.ship_to or Path(pretrained.__file__).parent
    save_rule(dest / f"{args.name}.pt", rule, meta)
    (dest / f"{args.name}.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"shipped {args.weights} as {args.name!r} in {dest}: worst ratio {worst:.3f}")
    for steps, entry in by_steps.items():
        gms = ", ".join(f"{r['geometric_mean']:.3f}" for r in entry["streams"])
        print(
            f"  {steps} steps: {len(entry['streams'])} streams, worst {entry['worst']:.3f}, "
            f"geometric means {gms}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
