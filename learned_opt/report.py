"""Benchmark records (JSONL), tables and plots made from them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .evaluate import RunResult, markdown_table, summarize

__all__ = [
    "HAND_DESIGNED",
    "write_jsonl",
    "read_jsonl",
    "results_from_records",
    "plot_curves",
    "table",
]


def _sgd(p: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(p, lr=lr)


def _nesterov(p: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True)


def _adam(p: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(p, lr=lr)


def _rmsprop(p: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(p, lr=lr)


#: Hand-designed baselines by name: ``factory(params, lr)``.
HAND_DESIGNED = {"adam": _adam, "rmsprop": _rmsprop, "sgd": _sgd, "nesterov": _nesterov}


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def write_results(
    out: str | os.PathLike, records: Iterable[dict[str, Any]], lines: list[str]
) -> None:
    """A benchmark's outputs: ``out/records.jsonl``, ``out/table.md`` (``lines``), and the table
    printed."""
    out = Path(out)
    write_jsonl(out / "records.jsonl", records)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def results_from_records(records: Iterable[dict[str, Any]]) -> list[RunResult]:
    fields = RunResult.__dataclass_fields__
    return [RunResult(**{k: v for k, v in r.items() if k in fields}) for r in records]


def table(
    records: Iterable[dict[str, Any]], reference: str = "adam", metric: str = "final_train_loss"
) -> str:
    """Markdown table of final losses per optimizer, with a ratio to ``reference``."""
    return markdown_table(summarize(results_from_records(records), metric), reference)


def plot_curves(
    records: Iterable[dict[str, Any]], path: str | os.PathLike, title: str = ""
) -> None:
    """Mean minibatch training loss per step (band: one standard error) for each optimizer."""
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
        mean = np.nanmean(arr, axis=0)
        sem = np.nanstd(arr, axis=0) / np.sqrt(max(len(arr), 1))
        steps = np.arange(len(mean))
        ax.plot(steps, mean, label=f"{name} (lr={lrs[name]:.3g}, n={len(arr)})")
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
