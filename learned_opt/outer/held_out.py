"""The meta-trainer's held-out evaluation, which selects the weights kept as best.

The held-out tasks come from their own seed stream
(:data:`~learned_opt.evaluate.TRAINER_EVAL_STREAM`), so evaluating never changes what the run
trains on. A learned optimizer that starts from each task's own initialization is evaluated as
a user would run it (the drop-in optimizer, :func:`~learned_opt.evaluate.run_optimizer`, at the
learner's multiplier) beside Adam tuned on the same tasks; any other learner (one with a learned
initialization or step sizes, MAML, a black-box learner) by its own unroll without
meta-gradients.

With several processes (``torch.distributed``) each runs every ``world_size``-th task and the
per-task results are summed across them, so an evaluation takes ``1 / world_size`` of the time
and every process gets the same metric (each task's run depends on its seed alone).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .. import distributed
from ..evaluate import (
    DEFAULT_LR_GRID,
    HAND_DESIGNED,
    TRAINER_EVAL_STREAM,
    best_lr,
    geometric_mean,
    mean_loss,
    run_optimizer,
    task_seed,
)
from ..learners import MetaLearner, OptimizerLearner
from ..optim import LearnedOptimizer
from ..rules import UpdateRule
from ..tasks import Task, TaskFamily
from .config import MetaTrainConfig
from .unroll import UnrollSpec, unroll

__all__ = ["HeldOut"]


class _Balanced(TaskFamily):
    """The members of a mixture in turn: the task of ``seeds[k]`` comes from member ``k mod n``
    (``config.eval_balanced``). The held-out runs seed each task's generator with its seed
    (:func:`~learned_opt.evaluate.run_optimizer`), which is how a draw finds its member."""

    name = "balanced"

    def __init__(self, mixture: TaskFamily, seeds: Sequence[int]) -> None:
        members = getattr(mixture, "members", None)
        if not members:
            raise ValueError(
                f"eval_balanced needs a mixture of task families, not {type(mixture).__name__}"
            )
        self.mixture = mixture
        self.member_of = {seed: members[k % len(members)] for k, seed in enumerate(seeds)}

    def sample(self, generator: torch.Generator) -> Task:
        seed = generator.initial_seed()
        if seed not in self.member_of:
            raise ValueError(f"seed {seed} is none of the held-out tasks'")
        return self.member_of[seed].sample(generator)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "mixture": self.mixture.config()}


class HeldOut:
    """The held-out evaluation of a run: ``config.eval_tasks`` tasks of ``family`` unrolled for
    ``config.eval_horizon_steps()`` steps.

    The metric of the per-task final losses (training loss with the ``"train"`` and
    ``"final-train"`` objectives, held-out loss with ``"test"``) is their mean, or with
    ``log_meta_loss`` their geometric mean; ``inf`` if any is not finite. A rule that reads the
    run's length is told it, and with ``config.eval_untold`` each task also runs untold: the
    metric then aggregates the final losses of both runs of every task (the curve is the told
    runs'), and :attr:`parts` holds the metric of each half (``{"told": ..., "untold": ...}``;
    empty after an evaluation that ran each task once).
    """

    def __init__(self, config: MetaTrainConfig, family: TaskFamily) -> None:
        self.config = config
        self.horizon = config.eval_horizon_steps()
        self.seeds = [
            task_seed(config.seed, TRAINER_EVAL_STREAM, k) for k in range(config.eval_tasks)
        ]
        self.family = _Balanced(family, self.seeds) if config.eval_balanced else family
        train = config.objective in ("train", "final-train")
        self.metric_name = "final_train_loss" if train else "final_test_loss"
        self.parts: dict[str, float] = {}

    def aggregate(self, values: Sequence[float]) -> float:
        """The evaluation metric of per-task final losses."""
        return geometric_mean(values) if self.config.log_meta_loss else mean_loss(values)

    def evaluate(self, learner: MetaLearner) -> tuple[float, np.ndarray]:
        """The metric of ``learner`` on the held-out tasks, and its mean loss curve (per step,
        over the tasks still running)."""
        # A learned optimizer that a user can run as it is (no learned initialization or step
        # sizes) is scored as one; any other learner by its own unroll.
        drop_in = learner.drop_in() if isinstance(learner, OptimizerLearner) else None
        if drop_in is None:
            self.parts = {}
            return self.evaluate_learner(learner)
        return self.evaluate_rule(*drop_in)

    def evaluate_rule(self, rule: UpdateRule, lr: float = 1.0) -> tuple[float, np.ndarray]:
        """The metric of the drop-in optimizer running ``rule`` at the multiplier ``lr`` on the
        held-out tasks, and its mean loss curve (per step, over the tasks still running)."""
        self.parts = {}
        if rule.nonfinite_weights():  # (the optimizer refuses such weights)
            return math.inf, np.full(self.horizon, math.nan)

        # A rule that reads the run's length is told it, as meta-training's unrolls tell it.
        reads_horizon = getattr(rule, "reads_horizon", False)
        told = {"total_steps": self.horizon} if reads_horizon else {}

        def run_all(horizon: dict[str, int]) -> tuple[list[float], np.ndarray]:
            def factory(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
                return LearnedOptimizer(params, rule, lr=lr, **horizon)

            def one(seed: int) -> tuple[float, Sequence[float]]:
                run = run_optimizer(self.family, seed, factory, lr, self.horizon, name="learned")
                return getattr(run, self.metric_name), run.losses

            return self._spread(one)

        values, curves = run_all(told)
        if self.config.eval_untold and reads_horizon:
            untold, _ = run_all({})
            self.parts = {"told": self.aggregate(values), "untold": self.aggregate(untold)}
            values += untold
        return self.aggregate(values), np.nanmean(curves, axis=0)

    def _spread(
        self, one: Callable[[int], tuple[float, Sequence[float]]]
    ) -> tuple[list[float], np.ndarray]:
        """``one(seed)`` (a task's final value and its per-step curve, ``horizon`` entries) for
        every seed, this process running every ``world_size``-th: the values in seed order, and
        the curves as rows."""
        n, world = len(self.seeds), distributed.world_size()
        values = torch.zeros(n, dtype=torch.float64)
        curves = torch.zeros(n, self.horizon, dtype=torch.float64)
        for k in range(distributed.rank(), n, world):
            value, curve = one(self.seeds[k])
            values[k] = float(value)
            curves[k] = torch.as_tensor(list(curve), dtype=torch.float64)
        distributed.all_reduce_sum([values, curves])  # the other processes' rows are zeros
        return values.tolist(), curves.numpy()

    def evaluate_learner(self, learner: MetaLearner) -> tuple[float, np.ndarray]:
        """Any learner: each task is unrolled without meta-gradients and scored with
        :meth:`MetaLearner.evaluate` on its whole ``task.test`` (the query set of a few-shot
        task), or with the ``"train"`` and ``"final-train"`` objectives on its whole
        ``task.train``; the curve is the mean inner training loss per step (NaN after a
        divergence)."""
        horizon = self.horizon

        def one(s: int) -> tuple[float, list[float]]:
            task = self.family.sample(torch.Generator().manual_seed(s))
            gen = torch.Generator().manual_seed(s + 1)
            spec = UnrollSpec(horizon=horizon, truncation=horizon)
            windows = list(unroll(learner, task, gen, spec, differentiable=False))
            with torch.no_grad():
                data = task.train if self.metric_name == "final_train_loss" else task.test
                value = float(learner.evaluate(task, windows[-1].state, data.full()))
            curve = torch.cat([w.train_losses for w in windows]).tolist()
            return value, curve + [math.nan] * (horizon - len(curve))

        values, curves = self._spread(one)
        return self.aggregate(values), np.nanmean(curves, axis=0)

    def adam_baseline(self) -> dict[str, Any]:
        """Adam at the best learning rate of :data:`~learned_opt.evaluate.DEFAULT_LR_GRID` on
        the same tasks (as :func:`~learned_opt.evaluate.tune_lr` chooses it, each process
        running its share of the tasks): ``{"metric", "lr", "curve"}``."""
        scores: dict[float, float] = {}
        curves: dict[float, np.ndarray] = {}
        for lr in sorted(DEFAULT_LR_GRID):

            def one(seed: int, lr: float = lr) -> tuple[float, Sequence[float]]:
                run = run_optimizer(self.family, seed, HAND_DESIGNED["adam"], lr, self.horizon,
                                    name="adam")  # fmt: skip
                return getattr(run, self.metric_name), run.losses

            values, curves[lr] = self._spread(one)
            scores[lr] = self.aggregate(values)
        initial = float(np.nanmean([c[0] for c in curves[min(scores)]]))
        best = best_lr(scores, initial)  # as tune_lr chooses (ties: the smallest)
        curve = np.nanmean(curves[best], axis=0)  # the runs still going, as mean_curve's
        return {"metric": scores[best], "lr": best, "curve": curve.tolist()}
