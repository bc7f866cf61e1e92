"""Benchmark records (JSONL), tables and plots made from them."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .evaluate import RunResult, mean_loss
from .files import atomic_write_text

__all__ = [
    "git_commit",
    "markdown_table",
    "plot_curves",
    "provenance",
    "read_jsonl",
    "results_from_records",
    "summarize",
    "table",
    "write_jsonl",
    "write_results",
]


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Writes one JSON object per line, atomically: an error or interruption part-way keeps the
    previous file whole. A diverged run's loss is written as Python's ``NaN`` / ``Infinity``
    tokens, which :func:`read_jsonl` (and pandas) read back."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


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


def _cpu() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; elsewhere the platform's)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == "model name":
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict[str, Any]:
    """What a result was measured with: the command that ran, the commit, Python, torch, the
    CPU, its cores and the threads torch uses."""
    import torch

    return {
        "command": shlex.join(["python", *sys.argv]),
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def write_results(
    out: str | os.PathLike, records: Iterable[dict[str, Any]], lines: list[str]
) -> None:
    """A benchmark's outputs: ``out/records.jsonl``, ``out/table.md`` (``lines``),
    ``out/provenance.json`` (:func:`provenance`: the command, commit and machine), and the
    table printed."""
    out = Path(out)
    write_jsonl(out / "records.jsonl", records)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "provenance.json").write_text(json.dumps(provenance(), indent=2) + "\n")
    print("\n".join(lines))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def results_from_records(records: Iterable[dict[str, Any]]) -> list[RunResult]:
    fields = RunResult.__dataclass_fields__
    return [RunResult(**{k: v for k, v in r.items() if k in fields}) for r in records]


def summarize(
    results: Iterable[RunResult], metric: str = "final_train_loss"
) -> list[dict[str, float | str | int]]:
    """Per optimizer: lr, number of seeds, mean (:func:`~learned_opt.evaluate.mean_loss`:
    ``inf`` where a seed diverged), standard deviation, standard error, median."""
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.optimizer, []).append(r)
    rows = []
    for name, runs in groups.items():
        values = np.array([getattr(r, metric) for r in runs], dtype=float)
        with np.errstate(invalid="ignore"):  # (NaN where a seed diverged)
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(
            {
                "optimizer": name,
                "lr": runs[0].lr,
                "seeds": len(runs),
                "mean": mean_loss(values.tolist()),
                "std": std,
                "sem": std / math.sqrt(len(values)),
                "median": float(np.median(values)),
            }
        )
    return rows


def markdown_table(rows: list[dict], reference: str | None = None) -> str:
    """A markdown table of :func:`summarize` rows; ``reference`` adds a ratio column (``n/a``
    where the reference diverged, ``diverged`` where the row did). A row with a true
    ``lr_at_edge`` shows its tuned learning rate as ``(edge)``."""
    ref = next((r["mean"] for r in rows if r["optimizer"] == reference), None)
    header = "| optimizer | lr | seeds | mean | std | sem | median |"
    sep = "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    if ref is not None:
        header += f" mean / {reference} |"
        sep += " ---: |"
    lines = [header, sep]
    for r in rows:
        edge = " (edge)" if r.get("lr_at_edge") else ""
        line = (
            f"| {r['optimizer']} | {r['lr']:.3g}{edge} | {r['seeds']} | {r['mean']:.4f} | "
            f"{r['std']:.4f} | {r['sem']:.4f} | {r['median']:.4f} |"
        )
        if ref is not None:
            if not math.isfinite(r["mean"]):
                line += " diverged |"
            elif not (math.isfinite(ref) and ref > 0):
                line += " n/a |"
            else:
                line += f" {r['mean'] / ref:.3f} |"
        lines.append(line)
    return "\n".join(lines)


def table(
    records: Iterable[dict[str, Any]], reference: str = "adam", metric: str = "final_train_loss"
) -> str:
    """Markdown table of final losses per optimizer, with a ratio to ``reference``; a tuned
    learning rate at the edge of its grid (a record's ``lr_at_edge``) is marked."""
    records = list(records)
    edges = {r["optimizer"] for r in records if r.get("lr_at_edge")}
    rows = summarize(results_from_records(records), metric)
    for row in rows:
        row["lr_at_edge"] = row["optimizer"] in edges
    return markdown_table(rows, reference)


def plot_curves(
    records: Iterable[dict[str, Any]], path: str | os.PathLike, title: str = ""
) -> None:
    """Mean minibatch training loss per step (band: one standard error) for each optimizer,
    over all its seeds: a curve ends where any seed diverged (as
    :func:`~learned_opt.evaluate.mean_curve` does, and the tables), and its label says at which
    step, instead of averaging the seeds still running."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[list[float]]] = {}
    lrs: dict[str, float] = {}
    for r in records:
        groups.setdefault(r["optimizer"], []).append(r["losses"])
        lrs[r["optimizer"]] = r["lr"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curves in groups.items():
        arr = np.array(curves, dtype=float)
        arr[~np.isfinite(arr)] = np.nan  # (an infinite loss: diverged too)
        mean = np.mean(arr, axis=0)  # NaN from the first step any seed diverged
        sem = np.std(arr, axis=0) / np.sqrt(max(len(arr), 1))
        steps = np.arange(len(mean))
        label = f"{name} (lr={lrs[name]:.3g}, n={len(arr)}"
        gone = np.flatnonzero(np.isnan(mean))
        if gone.size:
            label += f"; a seed diverged at step {int(gone[0])}"
        ax.plot(steps, mean, label=label + ")")
        ax.fill_between(steps, mean - sem, mean + sem, alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (minibatch)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
