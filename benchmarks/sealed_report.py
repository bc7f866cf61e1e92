"""The sealed test's report: markdown tables and plots from ``benchmarks/sealed.py``'s records
and summary rows (per task, horizon and optimizer), and which tasks are rated."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from learned_opt.evaluate import geometric_mean, smooth

#: Optimizers in the order of the tables; the first is the reference of every ratio.
OPTIMIZERS = (
    "adam",
    "adam-cosine",
    "muon",
    "muon-cosine",
    "muon-hidden",
    "muon-hidden-cosine",
    "prodigy",
    "dadapt-adam",
    "schedule-free",
    "learned",
    "learned-zeroed",
    "learned-cosine",
)


def _worst(ratios: Iterable[float]) -> float:
    """The largest ratio; NaN if any is (``max`` would skip a NaN that does not come first)."""
    values = list(ratios)
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def _fmt_speedup(s: dict[str, Any] | None) -> str:
    if s is None:
        return "1 (ref)"
    if s["status"] == "undefined":
        return "undef."
    if s["status"] == "censored":
        return f"<{s['value']:.2f}"
    return f"{s['value']:.2f}"


def _geo_speedup(rows: list[dict[str, Any]]) -> str:
    values = [r["speedup"] for r in rows if r["speedup"]["status"] != "undefined"]
    if not values:
        return "undef."
    gm = geometric_mean([v["value"] for v in values])
    censored = any(v["status"] == "censored" for v in values)
    undefined = len(rows) - len(values)
    text = ("≤" if censored else "") + f"{gm:.2f}"
    return text + (f" ({undefined} undef.)" if undefined else "")


#: A task is *rated* at a horizon when tuned Adam's final training loss is at least this
#: fraction of its initial loss: below it, a ratio compares two near-zero losses and says nothing.
MIN_LOSS_FRACTION = 0.05


def rated(row: dict[str, Any]) -> bool:
    """Whether tuned Adam's summary ``row`` ends at least :data:`MIN_LOSS_FRACTION` of its
    initial loss."""
    return row["final_train"] >= MIN_LOSS_FRACTION * row["initial_loss"]


def tables(summary: list[dict[str, Any]]) -> str:
    """Markdown tables per horizon: tuned Adam's losses, then per metric one line per task and
    a column per optimizer, with geometric means (and seed totals) over tasks; where some task
    is not :func:`rated`, also the geometric means over the rated ones."""
    out: list[str] = []
    opts = [o for o in OPTIMIZERS if any(r["optimizer"] == o for r in summary)]
    others = [o for o in opts if o != "adam"]
    for n_steps in sorted({r["steps"] for r in summary}):
        rows = [r for r in summary if r["steps"] == n_steps]
        task_names = list(dict.fromkeys(r["task"] for r in rows))
        cell = {(r["task"], r["optimizer"]): r for r in rows}
        good = [t for t in task_names if rated(cell[(t, "adam")])]
        out.append(f"## {n_steps} steps\n")
        out.append(
            "### Tuned Adam (the reference): learning rates and losses\n\n"
            f"A task is not rated where tuned Adam ends below {MIN_LOSS_FRACTION:.0%} of its "
            "initial loss (a ratio of near-zero losses says nothing).\n\n"
            "| task | Adam lr | cosine lr | initial loss | final train | final / initial | "
            "final held-out |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
        )
        for t in task_names:
            a, c = cell[(t, "adam")], cell.get((t, "adam-cosine"))
            edge = " (edge)" if a.get("lr_at_edge") else ""
            t = t if t in good else f"{t} (not rated)"
            cosine_lr = f"{c['lr']:g}" + (" (edge)" if c.get("lr_at_edge") else "") if c else "-"
            out.append(
                f"| {t} | {a['lr']:g}{edge} | {cosine_lr} | {a['initial_loss']:.4g} | "
                f"{a['final_train']:.4g} | {a['final_train'] / a['initial_loss']:.3f} | "
                f"{a['final_test']:.4g} |"
            )
        edges = [
            f"{t} ({o}: {cell[(t, o)]['lr']:g})"
            for t in task_names
            for o in others
            if o != "adam-cosine" and cell[(t, o)].get("lr_at_edge")
        ]
        out.append(
            "\nOther tuned learning rates at an edge of their grid: "
            + (", ".join(edges) if edges else "none")
            + "."
        )
        header = "| task | " + " | ".join(others) + " |"
        sep = "| --- |" + " ---: |" * len(others)
        for title, key, fmt in (
            ("Final training loss / tuned Adam's (below 1: better)", "ratio_train", "{:.3f}"),
            ("Final held-out loss / tuned Adam's", "ratio_test", "{:.3f}"),
        ):
            out.append(f"\n### {title}\n\n{header}\n{sep}")
            for t in task_names:
                vals = " | ".join(fmt.format(cell[(t, o)][key]) for o in others)
                out.append(f"| {t} | {vals} |")
            geo = " | ".join(
                f"**{geometric_mean([cell[(t, o)][key] for t in task_names]):.3f}**" for o in others
            )
            out.append(f"| **geometric mean** | {geo} |")
            if good and len(good) < len(task_names):
                geo = " | ".join(
                    f"**{geometric_mean([cell[(t, o)][key] for t in good]):.3f}**" for o in others
                )
                out.append(f"| **geometric mean, {len(good)} rated tasks** | {geo} |")
            worst = " | ".join(
                f"{_worst(cell[(t, o)][key] for t in task_names):.3f}" for o in others
            )
            out.append(f"| worst task | {worst} |")
        out.append(
            "\n### Speedup: Adam's steps to its final smoothed loss / the optimizer's "
            "(above 1: faster; <x: never reached, an upper bound)\n\n" + header + "\n" + sep
        )
        for t in task_names:
            vals = " | ".join(_fmt_speedup(cell[(t, o)]["speedup"]) for o in others)
            out.append(f"| {t} | {vals} |")
        geo = " | ".join(f"**{_geo_speedup([cell[(t, o)] for t in task_names])}**" for o in others)
        out.append(f"| **geometric mean** | {geo} |")
        out.append(
            "\n### Seeds won (final training loss below tuned Adam's on the same seed)\n\n"
            + header
            + "\n"
            + sep
        )
        for t in task_names:
            vals = " | ".join(f"{cell[(t, o)]['won']}/{cell[(t, o)]['seeds']}" for o in others)
            out.append(f"| {t} | {vals} |")
        totals = " | ".join(
            f"**{sum(cell[(t, o)]['won'] for t in task_names)}/"
            f"{sum(cell[(t, o)]['seeds'] for t in task_names)}**"
            for o in others
        )
        out.append(f"| **all** | {totals} |\n")
    return "\n".join(out)


def plot(records: list[dict[str, Any]], summary: list[dict[str, Any]], out: Path) -> list[Path]:
    """``curves-<steps>.png`` (smoothed mean training loss per task and optimizer) and
    ``ratios.png`` (final-loss ratios per task and optimizer, one panel per horizon)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    horizons = sorted({r["steps"] for r in summary})
    opts = [o for o in OPTIMIZERS if any(r["optimizer"] == o for r in summary)]
    for n_steps in horizons:
        task_names = list(dict.fromkeys(r["task"] for r in summary if r["steps"] == n_steps))
        cols = min(4, len(task_names))
        nrows = math.ceil(len(task_names) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
        window = max(1, math.ceil(0.05 * n_steps))
        for ax, t in zip(axes.flat, task_names):
            for o in opts:
                curves = [
                    r["losses"]
                    for r in records
                    if r["benchmark_task"] == t and r["steps"] == n_steps and r["optimizer"] == o
                ]
                mean = smooth(np.mean(np.array(curves, dtype=float), axis=0), window)
                ax.plot(np.arange(len(mean)), mean, label=o, lw=1.2)
            ax.set_yscale("log")
            ax.set_title(t, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        for ax in list(axes.flat)[len(task_names) :]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"sealed test, {n_steps} steps: mean training loss (smoothed, {window})")
        fig.tight_layout()
        path = out / f"curves-{n_steps}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    others = [o for o in opts if o != "adam"]
    fig, axes = plt.subplots(1, len(horizons), figsize=(7 * len(horizons), 4), squeeze=False)
    for ax, n_steps in zip(axes.flat, horizons):
        rows = [r for r in summary if r["steps"] == n_steps]
        task_names = list(dict.fromkeys(r["task"] for r in rows))
        cell = {(r["task"], r["optimizer"]): r for r in rows}
        width = 0.8 / max(1, len(others))
        for k, o in enumerate(others):
            vals = [min(cell[(t, o)]["ratio_train"], 10.0) for t in task_names]
            ax.bar(np.arange(len(task_names)) + k * width, vals, width, label=o)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(task_names)) + 0.4 - width / 2)
        ax.set_xticklabels(task_names, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"final training loss / tuned Adam's, {n_steps} steps (capped at 10)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "ratios.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
