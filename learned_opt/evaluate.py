"""Evaluation: train tasks with any torch optimizer, tune learning rates, summarize.

Every optimizer, learned or hand-designed, is run the same way a user would run it: real leaf
tensors, ``loss.backward()``, ``opt.step()``. Each seed fixes the task (data stream) and the initial
parameters, so all optimizers see exactly the same problems.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

from .tasks import TaskFamily

__all__ = [
    "OptimizerFactory",
    "RunResult",
    "run_optimizer",
    "tune_lr",
    "summarize",
    "markdown_table",
    "task_seed",
    "DEFAULT_LR_GRID",
]

#: ``factory(params, lr) -> optimizer``.
OptimizerFactory = Callable[[list[Tensor], float], torch.optim.Optimizer]

#: Learning rates tried when tuning a hand-designed optimizer (log-spaced, half decades).
DEFAULT_LR_GRID: tuple[float, ...] = (
    1e-4,
    3e-4,
    1e-3,
    3e-3,
    1e-2,
    3e-2,
    1e-1,
    3e-1,
    1.0,
    3.0,
    10.0,
)


def task_seed(*key: int) -> int:
    """A well-mixed 63-bit seed from integers (``numpy.random.SeedSequence``)."""
    return int(
        np.random.SeedSequence(list(key)).generate_state(2, np.uint32).view(np.uint64)[0]
        >> np.uint64(1)
    )


@dataclass
class RunResult:
    """One optimizer run on one task.

    Attributes:
        optimizer: name of the optimizer.
        lr: learning rate (or multiplier) used.
        seed: the task/initialization seed.
        losses: minibatch training loss before each step (``steps`` entries, NaN once diverged).
        final_train_loss: loss on the task's whole training set after the last step.
        final_test_loss: loss on the task's whole held-out set after the last step.
        seconds: wall time of the training loop.
    """

    optimizer: str
    lr: float
    seed: int
    losses: list[float]
    final_train_loss: float
    final_test_loss: float
    seconds: float
    task: str = ""
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        """A JSON-serializable dict (one JSONL line)."""
        return asdict(self)


def _nan_to_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def run_optimizer(
    family: TaskFamily,
    seed: int,
    factory: OptimizerFactory,
    lr: float,
    steps: int,
    *,
    name: str = "",
) -> RunResult:
    """Train one task of ``family`` (fixed by ``seed``) for ``steps`` steps with ``factory``."""
    task = family.sample(torch.Generator().manual_seed(seed))
    params = task.init_params(torch.Generator().manual_seed(seed + 1))
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    opt = factory(list(leaves.values()), lr)
    losses: list[float] = []
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = task.loss(leaves, task.train.sample())
        value = float(loss.detach())
        if not math.isfinite(value):
            losses += [math.nan] * (steps - len(losses))
            break
        losses.append(value)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - start
    with torch.no_grad():
        final_train = float(task.loss(leaves, task.train.full()))
        final_test = float(task.loss(leaves, task.test.full()))
    return RunResult(
        name or type(opt).__name__, lr, seed, losses, final_train, final_test, seconds, task.name
    )


def tune_lr(
    family: TaskFamily,
    factory: OptimizerFactory,
    seeds: Sequence[int],
    steps: int,
    lrs: Iterable[float] = DEFAULT_LR_GRID,
    *,
    name: str = "",
    metric: str = "final_train_loss",
) -> tuple[float, dict[float, float]]:
    """Pick the learning rate with the lowest mean ``metric`` over ``seeds``.

    Diverged runs count as ``inf``. The tuning seeds must differ from the evaluation seeds.

    Returns:
        ``(best_lr, {lr: mean metric})``.
    """
    scores: dict[float, float] = {}
    for lr in lrs:
        values = [
            _nan_to_inf(getattr(run_optimizer(family, s, factory, lr, steps, name=name), metric))
            for s in seeds
        ]
        scores[lr] = float(np.mean(values))
    best = min(scores, key=lambda k: (scores[k], k))
    return best, scores


def summarize(
    results: Iterable[RunResult], metric: str = "final_train_loss"
) -> list[dict[str, float | str | int]]:
    """Per optimizer: lr, number of seeds, mean, standard deviation, standard error, median."""
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.optimizer, []).append(r)
    rows = []
    for name, runs in groups.items():
        values = np.array([getattr(r, metric) for r in runs], dtype=float)
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(
            {
                "optimizer": name,
                "lr": runs[0].lr,
                "seeds": len(runs),
                "mean": float(values.mean()),
                "std": std,
                "sem": std / math.sqrt(len(values)),
                "median": float(np.median(values)),
            }
        )
    return rows


def markdown_table(rows: list[dict], reference: str | None = None) -> str:
    """A markdown table of :func:`summarize` rows; ``reference`` adds a ratio column."""
    ref = next((r["mean"] for r in rows if r["optimizer"] == reference), None)
    header = "| optimizer | lr | seeds | mean | std | sem | median |"
    sep = "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    if ref is not None:
        header += f" mean / {reference} |"
        sep += " ---: |"
    lines = [header, sep]
    for r in rows:
        line = (
            f"| {r['optimizer']} | {r['lr']:.3g} | {r['seeds']} | {r['mean']:.4f} | "
            f"{r['std']:.4f} | {r['sem']:.4f} | {r['median']:.4f} |"
        )
        if ref is not None:
            line += f" {r['mean'] / ref:.3f} |"
        lines.append(line)
    return "\n".join(lines)
