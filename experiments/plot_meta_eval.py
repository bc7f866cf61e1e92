"""Plot the held-out evaluation over meta-training (TensorBoard ``eval/ratio_vs_adam``: the learned
optimizer's mean held-out loss on the evaluation tasks over tuned Adam's), one panel per run.

    python experiments/plot_meta_eval.py --run "stage 1=runs/mnist-s1/tb@1620" \\
        --run "stage 3=runs/mnist-s3/tb" --mark 0.85 --out experiments/results/mnist

``@N`` keeps the evaluations up to meta-iteration N (the part of a run that was used).

Writes ``meta_eval.csv`` (run, meta-iteration, ratio) and ``meta_eval.png``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

TAG = "eval/ratio_vs_adam"


def read_curve(log_dir: str) -> list[tuple[int, float]]:
    """``(step, value)`` of :data:`TAG` in a TensorBoard directory, the last value per step (a
    resumed run may log a step twice)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    if TAG not in acc.Tags()["scalars"]:
        raise SystemExit(f"{log_dir}: no {TAG} scalars (was it a meta-training log directory?)")
    return sorted({e.step: e.value for e in acc.Scalars(TAG)}.items())


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="LABEL=TB_DIR[@LAST]")
    parser.add_argument("--mark", type=float, action="append", default=[], help="a target line")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    runs = []
    for spec in args.run:
        label, sep, log_dir = spec.partition("=")
        log_dir, at, last = log_dir.partition("@")
        if not sep or (at and not last.isdigit()):
            parser.error(f"--run {spec!r}: expected LABEL=TB_DIR[@LAST_ITERATION]")
        curve = read_curve(log_dir)
        if at:
            curve = [(step, v) for step, v in curve if step <= int(last)]
        runs.append((label, curve))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "meta_eval.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "meta_iteration", "ratio_vs_adam"])
        for label, curve in runs:
            w.writerows((label, step, f"{value:.4f}") for step, value in curve)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, (label, curve) in zip(axes[0], runs):
        steps, values = zip(*curve)
        ax.plot(steps, values, marker=".", lw=1)
        best = min(range(len(values)), key=values.__getitem__)
        ax.plot([steps[best]], [values[best]], "r*", ms=10, label=f"best {values[best]:.3f}")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="tuned Adam")
        for m in args.mark:
            ax.axhline(m, color="green", lw=0.8, ls=":", label=f"{m}")
        # the first evaluation of a random initialization can be far off: keep the scale useful
        ax.set_ylim(min(values) * 0.95, min(max(values), 2.0) * 1.05)
        ax.set_title(label)
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel("held-out loss / tuned Adam's")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "meta_eval.png", dpi=110)
    print(f"wrote {out / 'meta_eval.csv'} and {out / 'meta_eval.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
