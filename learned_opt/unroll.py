"""The inner loop, unrolled in truncation windows. Returns meta-losses; does no I/O."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .learners import MetaLearner
from .tasks import Task

__all__ = ["OBJECTIVES", "Window", "unroll", "run_inner"]

#: Meta-objectives: "train" = mean training loss over the window (the paper's sum of losses,
#: scaled by 1/K); "test" = held-out loss at the end of the window.
OBJECTIVES = ("train", "test")


@dataclass
class Window:
    """One truncation window of an unroll.

    Attributes:
        meta_loss: the window's meta-loss (differentiable in theta when the unroll is), or
            ``None`` when the inner task diverged before any usable step.
        train_losses: the training loss of each inner step in the window (detached).
        start, end: inner steps covered, ``[start, end)``.
        state: the inner state at the end of the window (before detaching).
        diverged: the inner loss became non-finite or exploded; the unroll stops after this.
    """

    meta_loss: Tensor | None
    train_losses: Tensor
    start: int
    end: int
    state: Any
    diverged: bool = False


def unroll(
    learner: MetaLearner,
    task: Task,
    generator: torch.Generator,
    *,
    horizon: int = 100,
    truncation: int = 20,
    objective: str = "train",
    differentiable: bool = True,
    max_loss_ratio: float | None = None,
) -> Iterator[Window]:
    """Run ``horizon`` inner steps, yielding a :class:`Window` every ``truncation`` steps.

    The consumer backpropagates each window's meta-loss before asking for the next window; the
    state is detached between windows (truncated backpropagation through time).

    Args:
        learner: the meta-learner (f_theta).
        task: the inner problem.
        generator: randomness of the inner state (the initial parameters).
        horizon: inner steps in all (T).
        truncation: inner steps per window (K).
        objective: one of :data:`OBJECTIVES`.
        differentiable: build the graph for meta-gradients (``False`` for evaluation).
        max_loss_ratio: if set, an inner loss that is non-finite or above this multiple of the
            first loss ends the unroll early (flagged ``diverged``) instead of poisoning the
            meta-gradient with it.
    """
    if horizon < 1 or truncation < 1:
        raise ValueError(f"Invalid horizon/truncation: {horizon}/{truncation}")
    if objective not in OBJECTIVES:
        raise ValueError(f"Invalid objective {objective!r}; expected one of {OBJECTIVES}")
    state = learner.init_state(task, generator)
    first_loss: float | None = None
    for start in range(0, horizon, truncation):
        end = min(start + truncation, horizon)
        losses: list[Tensor] = []
        diverged = False
        for _ in range(start, end):
            new_state, loss = learner.step(
                task, state, task.train.sample(), differentiable=differentiable
            )
            value = float(loss.detach())
            if first_loss is None:
                first_loss = value
            if not math.isfinite(value) or (
                max_loss_ratio is not None and value > max_loss_ratio * max(first_loss, 1e-12)
            ):
                diverged = True
                break
            losses.append(loss)
            state = new_state
        train_losses = torch.stack([x.detach() for x in losses]) if losses else torch.zeros(0)
        meta_loss: Tensor | None
        if not losses:
            meta_loss = None
        elif objective == "train":
            meta_loss = torch.stack(losses).mean()
        else:
            meta_loss = learner.evaluate(task, state, task.test.sample())
        if meta_loss is not None and not differentiable:
            meta_loss = meta_loss.detach()
        yield Window(meta_loss, train_losses, start, start + len(losses), state, diverged)
        if diverged:
            return
        state = learner.detach_state(state)


def run_inner(
    learner: MetaLearner, task: Task, generator: torch.Generator, steps: int
) -> tuple[Tensor, Any]:
    """Train ``task`` for ``steps`` inner steps without meta-gradients.

    Returns:
        ``(train_losses, final_state)``; ``train_losses`` has one entry per step taken (fewer than
        ``steps`` if the loss became non-finite).
    """
    losses: list[Tensor] = []
    state = None
    for window in unroll(
        learner, task, generator, horizon=steps, truncation=steps, differentiable=False
    ):
        losses.append(window.train_losses)
        state = window.state
    return torch.cat(losses), state
