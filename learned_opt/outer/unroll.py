"""The inner loop, unrolled in truncation windows. Returns meta-losses; does no I/O.

:class:`UnrollSpec` says what one task's unroll is (its length, its windows and the meta-loss of
a window); :func:`unroll` runs it for a learner and yields one :class:`Window` per truncation
window, and every meta-gradient estimator (:mod:`learned_opt.outer.estimators`) takes the same
``(learner, task, generator, spec)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..learners import MetaLearner
from ..tasks import Task
from .grad_checkpoint import CheckpointedWindow, checkpoint_segments

__all__ = [
    "OBJECTIVES",
    "UnrollSpec",
    "Window",
    "end_batch",
    "run_inner",
    "tell_horizon",
    "unroll",
]

#: Meta-objectives: "train" = mean training loss over the window (the paper's sum of losses,
#: scaled by 1/K); "test" = held-out loss at the end of the window; "final-train" = training loss
#: at the end of the window, on a fresh training minibatch (what a run's final training loss
#: measures, without the held-out loss's reward for regularizing).
OBJECTIVES = ("train", "test", "final-train")


def end_batch(task: Task, objective: str):
    """The batch a window's end is scored on: held-out with ``"test"``, a fresh training batch
    with ``"final-train"`` (``"train"`` scores the window's own losses: none)."""
    if objective == "train":
        return None
    return task.test.sample() if objective == "test" else task.train.sample()


@dataclass(frozen=True)
class UnrollSpec:
    """What one task's unroll is: its length, its truncation windows and their meta-loss.

    Attributes:
        horizon: inner steps in all (T).
        truncation: inner steps per window (K).
        objective: one of :data:`OBJECTIVES`.
        max_loss_ratio: if set, an inner loss that is non-finite or above this multiple of the
            first loss ends the unroll early (flagged ``diverged``) instead of poisoning the
            meta-gradient with it.
        log_meta_loss: the window's meta-loss is the log of the objective. Its gradient does
            not depend on the scale of the task's loss, so tasks of very different loss scales
            (a mixture of families, random loss rescaling) weigh alike in a meta-batch.
        loss_aversion: ``lambda >= 0`` of the loss-averse objective against a ``reference``
            learner (see :func:`unroll`); unused without one.
        meta_loss_floor: ``F >= 0``; with ``log_meta_loss``, the meta-loss is
            ``log(L + F L_1)``, ``L_1`` the unroll's first training loss, so that a task driven
            near zero loss does not steer the meta-gradient by the ratios of its tiny losses
            (the benchmarks do not rate a task that tuned Adam takes below 5% of its first
            loss, for the same reason).
        told: rules that read how far training has gone are told the horizon (``False``:
            they run as they would without ``total_steps``, a horizon-free run).
    """

    horizon: int = 100
    truncation: int = 20
    objective: str = "train"
    max_loss_ratio: float | None = None
    log_meta_loss: bool = False
    loss_aversion: float = 0.0
    meta_loss_floor: float = 0.0
    told: bool = True

    def __post_init__(self) -> None:
        if self.horizon < 1 or self.truncation < 1:
            raise ValueError(f"Invalid horizon/truncation: {self.horizon}/{self.truncation}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"Invalid objective {self.objective!r}; expected one of {OBJECTIVES}")
        if not (math.isfinite(self.loss_aversion) and self.loss_aversion >= 0):
            raise ValueError(f"Invalid loss_aversion: {self.loss_aversion} (must be >= 0)")
        if not (math.isfinite(self.meta_loss_floor) and self.meta_loss_floor >= 0):
            raise ValueError(f"Invalid meta_loss_floor: {self.meta_loss_floor} (must be >= 0)")
        if self.meta_loss_floor and not self.log_meta_loss:
            raise ValueError("meta_loss_floor needs log_meta_loss (it floors the log's argument)")

    def replace(self, **changes: Any) -> UnrollSpec:
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)


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
        reference_objective: with a ``reference`` learner, its objective on the window (same
            batches; ``None`` without one, or once the reference diverged).
    """

    meta_loss: Tensor | None
    train_losses: Tensor
    start: int
    end: int
    state: Any
    diverged: bool = False
    reference_objective: float | None = None


class _DivergenceCheck:
    """Whether an inner loss is non-finite or above ``ratio`` times the unroll's first loss."""

    def __init__(self, ratio: float | None) -> None:
        self.ratio = ratio
        self.first: float | None = None

    def __call__(self, loss: Tensor) -> bool:
        value = float(loss.detach())
        if self.first is None:
            self.first = value
        return not math.isfinite(value) or (
            self.ratio is not None and value > self.ratio * max(self.first, 1e-12)
        )


def tell_horizon(state: Any, horizon: int, told: bool = True) -> Any:
    """``state`` with the run's length written into its rule state, for rules that read how far
    training has gone (their state has a ``total_steps`` entry); other states unchanged.
    ``told=False``: the state as it is (a fresh state's length is unknown)."""
    if not told:
        return state
    rule_state = getattr(state, "rule_state", None)
    if isinstance(rule_state, dict) and "total_steps" in rule_state:
        old = rule_state["total_steps"]
        rule_state["total_steps"] = torch.full_like(old, float(horizon))
    return state


def unroll(
    learner: MetaLearner,
    task: Task,
    generator: torch.Generator,
    spec: UnrollSpec | None = None,
    *,
    reference: MetaLearner | None = None,
    differentiable: bool = True,
    checkpoint_segment: int | Sequence[int] | None = None,
    **fields: Any,
) -> Iterator[Window]:
    """Run ``spec.horizon`` inner steps, yielding a :class:`Window` every ``spec.truncation``.

    The consumer backpropagates each window's meta-loss before asking for the next window; the
    state is detached between windows (truncated backpropagation through time).

    Args:
        learner: the meta-learner (f_theta).
        task: the inner problem.
        generator: randomness of the inner state (the initial parameters).
        spec: the unroll (:class:`UnrollSpec`); keyword ``fields`` of it (``horizon=...``)
            override it, so that ``unroll(learner, task, gen, horizon=10)`` is
            ``unroll(learner, task, gen, UnrollSpec(horizon=10))``.
        reference: a second learner (e.g. the rule the meta-training started from, frozen) run
            beside ``learner`` from the same initial state on the same batches, without
            meta-gradients. The window's meta-loss becomes the log-ratio of the two objectives,
            ``log(L / L_ref)`` (requires ``log_meta_loss``), times ``1 + loss_aversion`` when
            it is positive (``learner`` did worse than the reference on this window): a
            loss-averse objective, so that large gains on a few tasks cannot pay for losses on
            others. Once the reference diverges, windows fall back to ``log(L)``.
        differentiable: build the graph for meta-gradients (``False`` for evaluation).
        checkpoint_segment: if set, gradient checkpointing
            (:mod:`~learned_opt.outer.grad_checkpoint`): ``S >= 1``, one level of segments of
            ``S`` inner steps (``sqrt_segment`` is the usual choice), or ``(S1, S2, ..., SL)``
            with ``S1 > S2 > ... >= 1``, nested levels (``checkpoint_schedule`` chooses them
            from K; ``schedule_cost`` counts the recomputation and the states kept). The
            windows, meta-gradients and batch stream are those of the plain unroll. Ignored
            when ``differentiable`` is ``False`` or grad is disabled (there is nothing to keep).
    """
    spec = spec or UnrollSpec()
    if fields:
        spec = spec.replace(**fields)
    if reference is not None and not spec.log_meta_loss:
        raise ValueError("A reference learner needs log_meta_loss (the meta-loss is a log-ratio)")
    sizes = None if checkpoint_segment is None else checkpoint_segments(checkpoint_segment)
    horizon, truncation, objective = spec.horizon, spec.truncation, spec.objective
    ref_state = None
    if reference is not None:  # the same phi_0: a generator in the same state
        ref_generator = torch.Generator(device=generator.device)
        ref_generator.set_state(generator.get_state())
        ref_state = tell_horizon(reference.init_state(task, ref_generator), horizon, spec.told)
    state = tell_horizon(learner.init_state(task, generator), horizon, spec.told)
    diverges = _DivergenceCheck(spec.max_loss_ratio)
    for start in range(0, horizon, truncation):
        end = min(start + truncation, horizon)
        losses: list[Tensor] = []
        diverged = False
        checkpointed = None
        if sizes is not None and differentiable and torch.is_grad_enabled():
            checkpointed = CheckpointedWindow(learner, task, sizes, differentiable)
        ref_losses: list[float] = []
        for _ in range(start, end):
            if checkpointed is not None:
                new_state, loss = checkpointed.step(state)
                batch = checkpointed.last_batch
            else:
                batch = task.train.sample()
                new_state, loss = learner.step(task, state, batch, differentiable=differentiable)
            if ref_state is not None:
                ref_state, ref_loss = reference.step(  # type: ignore[union-attr]
                    task, ref_state, batch, differentiable=False
                )
                ref_losses.append(float(ref_loss))
            if diverges(loss):
                diverged = True
                break  # the diverged step's graph is dropped with new_state
            losses.append(loss)
            state = new_state
        if checkpointed is not None:
            checkpointed.finish()
        train_losses = torch.stack([x.detach() for x in losses]) if losses else torch.zeros(0)
        meta_loss: Tensor | None
        ref_objective: float | None = None
        if not losses:
            meta_loss = None
        elif objective == "train":
            meta_loss = torch.stack(losses).mean()
            if ref_state is not None:
                ref_objective = sum(ref_losses[: len(losses)]) / len(losses)
        else:
            batch = end_batch(task, objective)
            meta_loss = learner.evaluate(task, state, batch)
            if ref_state is not None:
                with torch.no_grad():
                    ref_objective = float(reference.evaluate(task, ref_state, batch))  # type: ignore[union-attr]
        if ref_objective is not None and not (math.isfinite(ref_objective) and ref_objective > 0):
            ref_objective, ref_state = None, None  # the reference diverged: stop running it
        if meta_loss is not None and spec.log_meta_loss:
            floor = spec.meta_loss_floor * (diverges.first or 0.0)  # (the same start for both)
            meta_loss = torch.log(meta_loss + floor)
            if ref_objective is not None:
                meta_loss = meta_loss - math.log(ref_objective + floor)
                if float(meta_loss.detach()) > 0:
                    meta_loss = meta_loss * (1.0 + spec.loss_aversion)
        if meta_loss is not None and not differentiable:
            meta_loss = meta_loss.detach()
        yield Window(
            meta_loss, train_losses, start, start + len(losses), state, diverged, ref_objective
        )
        if diverged:
            return
        state = learner.detach_state(state)
        if ref_state is not None:
            ref_state = reference.detach_state(ref_state)  # type: ignore[union-attr]


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
    for window in unroll(learner, task, generator, UnrollSpec(steps, steps), differentiable=False):
        losses.append(window.train_losses)
        state = window.state
    return torch.cat(losses), state
