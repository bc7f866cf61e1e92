"""Evaluation against tuned baselines: runs, seed streams, learning-rate tuning, comparisons.

Every optimizer, learned or hand-designed, is run the way a user would run it: real leaf tensors,
``loss.backward()``, ``opt.step()`` (:func:`run_optimizer`). A seed fixes the task (data stream)
and the initial parameters, so all optimizers see exactly the same problems; the seeds come from
named, disjoint streams (:class:`SeedStreams`). A baseline's learning rate is tuned on a grid on
tuning seeds (:func:`tune_lr`); the learned optimizer runs untuned (multiplier 1). A candidate is
compared with the tuned baseline on the evaluation seeds by :func:`versus`: the ratio of mean
final losses, the seeds won and the :func:`speedup`; ratios over tasks are summarized by their
:func:`geometric_mean`. The CLI (``learned-opt eval``), the meta-trainer's held-out evaluation and
the benchmarks all use these.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .tasks import FAMILIES, TaskFamily, make_family
from .tasks.fewshot import FEWSHOT_FAMILIES

__all__ = [
    "DEFAULT_LR_GRID",
    "HAND_DESIGNED",
    "OptimizerFactory",
    "COMPARISON_STREAMS",
    "RunResult",
    "SEALED_STREAMS",
    "STATE_DTYPE_STREAM",
    "SeedStreams",
    "TRAINER_EVAL_STREAM",
    "Tuning",
    "evaluation_family",
    "first_reach",
    "geometric_mean",
    "mean_curve",
    "mean_loss",
    "run_optimizer",
    "seeds_won",
    "smooth",
    "speedup",
    "task_seed",
    "best_lr",
    "tune_lr",
    "tune_lr_near",
    "versus",
]

#: ``factory(params, lr) -> optimizer``.
OptimizerFactory = Callable[[list[Tensor], float], torch.optim.Optimizer]


def takes_names(factory: OptimizerFactory) -> OptimizerFactory:
    """Mark an optimizer factory as taking the model's named parameters, ``(name, tensor)``
    pairs in the model's order (as ``torch.optim`` optimizers accept them), instead of tensors:
    :func:`run_optimizer` passes them so. For optimizers that treat layers by their role."""
    factory.named_parameters = True  # type: ignore[attr-defined]
    return factory


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

#: Hand-designed baselines by name: ``factory(params, lr)``.
HAND_DESIGNED: dict[str, OptimizerFactory] = {
    "adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
    "rmsprop": lambda p, lr: torch.optim.RMSprop(p, lr=lr),
    "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr),
    "nesterov": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True),
}


# ----------------------------------------------------------------------------- seed streams
def task_seed(*key: int) -> int:
    """A well-mixed 63-bit seed from integers (``numpy.random.SeedSequence``).

    Meta-training draws task ``j`` of iteration ``i`` from ``task_seed(seed, i, j)``
    (:meth:`~learned_opt.outer.config.MetaTrainConfig.task_generators`); evaluations draw from
    :class:`SeedStreams`.
    """
    return int(
        np.random.SeedSequence(list(key)).generate_state(2, np.uint32).view(np.uint64)[0]
        >> np.uint64(1)
    )


@dataclass(frozen=True)
class SeedStreams:
    """The tuning and evaluation seeds of a comparison: ``task_seed(seed, stream, k)``.

    Attributes:
        tune: the stream of the seeds that tune learning rates.
        eval: the stream of the seeds that are reported (never tuned on).
    """

    tune: int
    eval: int

    def tune_seeds(self, n: int, seed: int = 0) -> list[int]:
        return [task_seed(seed, self.tune, k) for k in range(n)]

    def eval_seeds(self, n: int, seed: int = 0) -> list[int]:
        return [task_seed(seed, self.eval, k) for k in range(n)]

    def seeds(self, tune: int, evals: int, seed: int = 0) -> tuple[list[int], list[int]]:
        """``(tuning seeds, evaluation seeds)``, checked disjoint."""
        a, b = self.tune_seeds(tune, seed), self.eval_seeds(evals, seed)
        if set(a) & set(b):
            raise ValueError("tuning and evaluation seeds overlap")
        return a, b


#: ``learned-opt eval`` and the out-of-distribution benchmark.
COMPARISON_STREAMS = SeedStreams(tune=1_000_003, eval=2_000_003)
#: The sealed-test benchmark.
SEALED_STREAMS = SeedStreams(tune=3_000_017, eval=4_000_037)
#: The tasks of the bfloat16-state benchmark (nothing is tuned there).
STATE_DTYPE_STREAM = 3_000_017
#: The meta-trainer's held-out tasks (its Adam baseline is tuned on the same tasks).
TRAINER_EVAL_STREAM = 7_777_777


def evaluation_family(name: str, **kwargs: Any) -> TaskFamily:
    """A named family for final figures, on data its meta-training and selection did not see
    (unless ``kwargs`` say otherwise): a family with a held-out split trains on its whole
    training split and reports its official held-out split (``holdout="test"``; meta-training
    selects on a validation split carved from the training data instead), a few-shot family
    draws its tasks from the meta-test split (``split="test"``: other classes, or for
    sinusoids an independent stream of tasks from the same distribution). The task groups
    (``meta-train*``, ``validation``) have no such split: each member reads the part of its
    data its group fixes, the data meta-training or selection used, and they are returned as
    they are, for comparisons on them (the sealed test group is ``benchmarks/sealed.py``'s).

    Raises:
        ValueError: unknown family name.
    """
    if name not in FAMILIES:
        raise ValueError(f"Unknown task family {name!r}; expected one of {sorted(FAMILIES)}")
    cls = FAMILIES[name][0]
    defaults = {"holdout": "test"} if "holdout" in inspect.signature(cls).parameters else {}
    if cls in FEWSHOT_FAMILIES:  # (``split`` means the meta-test split there, not elsewhere)
        defaults["split"] = "test"
    return make_family(name, **{**defaults, **kwargs})


# ------------------------------------------------------------------------------------- runs
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


def run_optimizer(
    family: TaskFamily,
    seed: int,
    factory: OptimizerFactory,
    lr: float,
    steps: int,
    *,
    name: str = "",
) -> RunResult:
    """Train one task of ``family`` (fixed by ``seed``) for ``steps`` steps with ``factory``.

    An optimizer with ``train()`` and ``eval()`` methods (schedule-free) is put in training mode
    for the steps and in evaluation mode for the final losses.
    """
    task = family.sample(torch.Generator().manual_seed(seed))
    params = task.init_params(torch.Generator().manual_seed(seed + 1))
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    named = getattr(factory, "named_parameters", False)
    opt = factory(list(leaves.items()) if named else list(leaves.values()), lr)
    modes = callable(getattr(opt, "train", None)) and callable(getattr(opt, "eval", None))
    if modes:
        opt.train()  # type: ignore[attr-defined]
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
    if modes:
        opt.eval()  # type: ignore[attr-defined]
    with torch.no_grad():
        final_train = float(task.loss(leaves, task.train.full()))
        final_test = float(task.loss(leaves, task.test.full()))
    return RunResult(
        name or type(opt).__name__, lr, seed, losses, final_train, final_test, seconds, task.name
    )


# ------------------------------------------------------------------------------- aggregates
def mean_loss(values: Sequence[float]) -> float:
    """The mean, ``inf`` if any value is not finite (a diverged run), NaN for no values."""
    if len(values) == 0:
        return math.nan
    if not all(math.isfinite(v) for v in values):
        return math.inf
    return float(np.mean(values))


def geometric_mean(values: Sequence[float]) -> float:
    """The geometric mean of positive finite values (``inf`` if any is ``inf``, NaN or not
    positive: a diverged run, or a ratio left undefined, counts as the worst; NaN for no
    values): the summary of losses and loss ratios over tasks. A loss driven to exactly zero
    counts as the worst too: on a log scale it would outweigh every other task, and no ratio
    to it is defined. Size tasks so that losses stay well above zero (or floor a meta-loss:
    ``MetaTrainConfig.meta_loss_floor``)."""
    if len(values) == 0:
        return math.nan
    if any(not (v > 0 and math.isfinite(v)) for v in values):
        return math.inf
    return float(np.exp(np.mean(np.log(values))))


def mean_curve(runs: Sequence[RunResult], skip_diverged: bool = False) -> np.ndarray:
    """The mean over seeds of the minibatch training losses per step: NaN where any seed has
    diverged (a diverged run never counts as having reached a loss), or with ``skip_diverged``
    the mean of the seeds still running."""
    curves = np.array([r.losses for r in runs], dtype=float)
    return np.nanmean(curves, axis=0) if skip_diverged else np.mean(curves, axis=0)


# ----------------------------------------------------------------------------------- tuning
@dataclass
class Tuning:
    """The outcome of :func:`tune_lr`.

    Attributes:
        lr: the best learning rate.
        scores: the aggregated metric of every learning rate tried, by learning rate.
        runs: the runs at the best learning rate.
        grid: the learning rates that could be tried.
    """

    lr: float
    scores: dict[float, float]
    runs: list[RunResult]
    grid: list[float]

    @property
    def at_edge(self) -> bool:
        """The best learning rate is the smallest or largest of the grid (widen it)."""
        return len(self.grid) > 1 and self.lr in (min(self.grid), max(self.grid))


def tune_lr(
    family: TaskFamily,
    factory: OptimizerFactory,
    seeds: Sequence[int],
    steps: int,
    lrs: Iterable[float] = DEFAULT_LR_GRID,
    *,
    name: str = "",
    metric: str = "final_train_loss",
    aggregate: Callable[[Sequence[float]], float] = mean_loss,
    widen: int = 0,
    tie_below: float = 1e-6,
) -> Tuning:
    """The learning rate of ``lrs`` with the lowest ``aggregate`` (by default :func:`mean_loss`:
    a diverged run counts as ``inf``) of ``metric`` over ``seeds``; ties go to the smallest.
    Scores below ``tie_below`` times the mean initial loss tie (where no score is negative):
    differences at float32's resolution rank nothing, and a rate that drives the tuning seeds'
    loss to exactly zero is more often at the edge of diverging than the best. While the best
    is at an edge of the grid, up to ``widen`` more values are tried past it (at the ratio of
    the grid's two values nearest that edge). The tuning seeds must differ from the evaluation
    seeds."""
    grid = sorted(lrs)
    scores: dict[float, float] = {}
    runs: dict[float, list[RunResult]] = {}

    def score(lr: float) -> None:
        runs[lr] = [run_optimizer(family, s, factory, lr, steps, name=name) for s in seeds]
        scores[lr] = aggregate([getattr(r, metric) for r in runs[lr]])

    for lr in grid:
        score(lr)
    initial = mean_loss([r.losses[0] for r in runs[grid[0]] if r.losses])
    best = best_lr(scores, initial, tie_below)
    for _ in range(widen if len(grid) > 1 else 0):
        if best == grid[0]:
            grid.insert(0, grid[0] * grid[0] / grid[1])
            score(grid[0])
        elif best == grid[-1]:
            grid.append(grid[-1] * grid[-1] / grid[-2])
            score(grid[-1])
        else:
            break
        best = best_lr(scores, initial, tie_below)
    return Tuning(best, scores, runs[best], grid)


def best_lr(scores: dict[float, float], initial: float, tie_below: float = 1e-6) -> float:
    """The learning rate of the lowest score, ties going to the smallest; scores below
    ``tie_below`` times ``initial`` (the mean initial loss) tie, where none is negative
    (:func:`tune_lr`)."""
    floor = -math.inf
    if math.isfinite(initial) and initial > 0 and not any(v < 0 for v in scores.values()):
        floor = tie_below * initial

    def rank(lr: float) -> tuple[float, float]:
        score = scores[lr] if not math.isnan(scores[lr]) else math.inf  # (no value: the worst)
        return max(score, floor), lr

    return min(scores, key=rank)


def tune_lr_near(
    family: TaskFamily,
    factory: OptimizerFactory,
    seeds: Sequence[int],
    steps: int,
    grid: Sequence[float],
    center: float,
    *,
    name: str = "",
) -> Tuning:
    """:func:`tune_lr` on the values of ``grid`` within a factor 10 of ``center`` (e.g. a tuned
    constant learning rate, for a scheduled variant), widened one grid value at a time while the
    best is at the edge of those tried (the full grid at most)."""
    grid = sorted(grid)
    tried = [lr for lr in grid if center / 10.0 * (1 - 1e-9) <= lr <= center * 10.0 * (1 + 1e-9)]
    tried = tried or list(grid)
    scores: dict[float, float] = {}
    runs: dict[float, list[RunResult]] = {}
    initial = math.nan
    while True:
        todo = [lr for lr in tried if lr not in scores]
        if todo:
            tuning = tune_lr(family, factory, seeds, steps, todo, name=name)
            scores.update(tuning.scores)
            runs[tuning.lr] = tuning.runs
            initial = mean_loss([r.losses[0] for r in tuning.runs if r.losses])
        best = best_lr(scores, initial)  # (the seeds' initial loss is every rate's)
        if best not in runs:  # (only where the floor differs between calls: run it again)
            runs[best] = [run_optimizer(family, s, factory, best, steps, name=name) for s in seeds]
        i = grid.index(best)
        if best == min(tried) and i > 0:
            tried.insert(0, grid[i - 1])
        elif best == max(tried) and i < len(grid) - 1:
            tried.append(grid[i + 1])
        else:
            return Tuning(best, dict(sorted(scores.items())), runs[best], list(grid))


# ------------------------------------------------------------------------------ comparisons
def seeds_won(
    runs: Sequence[RunResult], reference: Sequence[RunResult], metric: str = "final_train_loss"
) -> int:
    """On how many task seeds a run of ``runs`` ends below the ``reference`` run on the same
    seed (a non-finite loss never wins; a finite one wins against a non-finite reference).
    Unlike the ratio of means, one blow-up costs one seed."""
    theirs = {r.seed: getattr(r, metric) for r in reference}
    return sum(
        1
        for r in runs
        if r.seed in theirs
        and math.isfinite(getattr(r, metric))
        and not getattr(r, metric) >= theirs[r.seed]  # (NaN compares false)
    )


def smooth(curve: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average: entry ``i`` is the mean of ``curve[max(0, i - window + 1):i+1]``
    (NaN once any value in the window is NaN). Each window is summed afresh (a running sum
    would lose every later value to one large spike)."""
    arr = np.asarray(curve, dtype=float)
    sums = np.convolve(arr, np.ones(window))[: len(arr)]
    counts = np.minimum(np.arange(1, len(arr) + 1), window)
    return sums / counts


def first_reach(curve: np.ndarray, target: float) -> int | None:
    """The first step count ``i`` (the loss after ``i`` steps) with ``curve[i] <= target``."""
    hits = np.flatnonzero(curve <= target)
    return int(hits[0]) if len(hits) else None


def speedup(reference: np.ndarray, other: np.ndarray) -> dict[str, Any]:
    """How much sooner ``other`` reaches the final loss of ``reference`` (tuned Adam) than the
    reference does, on smoothed mean curves.

    The target is the reference's last value; ``adam_steps`` the first step its curve is at or
    below it, ``steps`` the first step ``other``'s is. Returns ``{"value", "status",
    "adam_steps", "steps"}`` with ``status``:

    - ``"ok"``: ``value = adam_steps / steps`` (above 1: faster than the reference);
    - ``"censored"``: ``other`` never reaches the target within the run, or diverges (also
      after reaching it): it would need more than ``T`` steps, so the speedup is *below*
      ``value = adam_steps / T`` (an upper bound, used as such in geometric means);
    - ``"undefined"``: the target is already met at step 0 (no progress to compare); ``value``
      is NaN.
    """
    target = float(reference[-1])
    adam_steps = first_reach(reference, target)
    if adam_steps is None or adam_steps == 0 or not math.isfinite(target):
        return {"value": math.nan, "status": "undefined", "adam_steps": adam_steps, "steps": None}
    steps = first_reach(other, target)
    if steps is None or not math.isfinite(float(other[-1])):
        value = adam_steps / len(reference)
        return {"value": value, "status": "censored", "adam_steps": adam_steps, "steps": None}
    steps = max(steps, 1)
    return {"value": adam_steps / steps, "status": "ok", "adam_steps": adam_steps, "steps": steps}


def versus(
    runs: Sequence[RunResult], reference: Sequence[RunResult], smooth_fraction: float = 0.05
) -> dict[str, Any]:
    """``runs`` against the ``reference`` runs (tuned Adam) on the same seeds.

    Returns ``{"lr", "seeds", "final_train", "final_test"}`` (mean final losses over the seeds,
    :func:`mean_loss`), ``"ratio_train"`` and ``"ratio_test"`` (those over the reference's;
    below 1: better), ``"won"`` (:func:`seeds_won` by final training loss), ``"speedup"`` (on
    mean curves smoothed over ``smooth_fraction`` of the horizon), ``"initial_loss"`` (the mean
    first minibatch loss) and ``"seconds"`` (mean wall time of a run).
    """
    steps = len(reference[0].losses)
    window = max(1, math.ceil(smooth_fraction * steps))
    train = mean_loss([r.final_train_loss for r in runs])
    test = mean_loss([r.final_test_loss for r in runs])

    def ratio(mine: float, key: str) -> float:  # undefined (NaN) when the reference diverged
        theirs = mean_loss([getattr(r, key) for r in reference])
        return mine / theirs if math.isfinite(theirs) else math.nan

    return {
        "lr": runs[0].lr,
        "seeds": len(runs),
        "final_train": train,
        "final_test": test,
        "ratio_train": ratio(train, "final_train_loss"),
        "ratio_test": ratio(test, "final_test_loss"),
        "won": seeds_won(runs, reference),
        "speedup": speedup(smooth(mean_curve(reference), window), smooth(mean_curve(runs), window)),
        "initial_loss": float(np.mean([r.losses[0] for r in runs])),
        "seconds": float(np.mean([r.seconds for r in runs])),
    }
