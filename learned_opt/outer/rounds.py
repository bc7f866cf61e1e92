"""One meta-training iteration: round after round of truncation windows of a batch of tasks.

Each task's unroll is a stream of per-window meta-gradient estimates (an estimator's
``unroll``). A round takes the next window of every stream still running; the mean of their
estimates (:func:`~learned_opt.outer.estimators.average_gradients`) makes one meta-step::

    streams = [estimator.unroll(learner, task_j, generator_j, spec_j) for each task j]
    for each round:
        estimates = [next(s) for s in streams (dropping exhausted ones)]
        grads = average_gradients(estimates)
        write_meta_gradient(learner, meta_opt, grads, clip_grad); meta_opt.step()

:class:`~learned_opt.outer.trainer.MetaTrainer` runs :func:`take_rounds` with its own meta-step
(skip counting, rollback, the learning-rate schedule); :func:`meta_train_iteration` is the same
loop for research code without the trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .. import distributed
from ..learners import MetaLearner
from .estimators import MetaGradient, average_gradients, clip_estimate, set_gradients

__all__ = ["MetaStep", "meta_train_iteration", "take_rounds", "write_meta_gradient"]

#: ``step(grads, meta_loss, count) -> (gradient norm, whether the meta-optimizer stepped)``:
#: ``grads`` and ``meta_loss`` are the means over this process's ``count`` usable windows.
MetaStep = Callable[[list[Tensor | None] | None, float, int], tuple[float, bool]]


def write_meta_gradient(
    learner: MetaLearner,
    meta_opt: torch.optim.Optimizer,
    grads: Sequence[Tensor | None] | None,
    clip_grad: float,
    count: int = 1,
) -> float | None:
    """Set the learner's ``.grad`` to ``grads``, the mean over this process's ``count`` usable
    windows (``None``: none), combined over the processes of a distributed run into the mean
    over all their windows (what one process holding them all computes; the same on all), and
    clip its norm to ``clip_grad`` (``0``: no clipping). Returns the norm before clipping, or
    ``None`` when no process has a usable window (no step)."""
    meta_opt.zero_grad(set_to_none=True)
    if grads is not None:
        set_gradients(learner, grads)
    if distributed.world_size() > 1:
        params = list(learner.parameters())
        weight = float(count) if grads is not None else 0.0
        # per parameter, whether any process has a gradient (none: it stays None, as in one
        # process, where the meta-optimizer then leaves it alone); and the processes' windows
        present = torch.tensor([float(p.grad is not None) for p in params] + [weight])
        for p in params:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad * weight
        distributed.all_reduce_sum([*(p.grad for p in params), present])
        total = float(present[-1])
        if total == 0:
            meta_opt.zero_grad(set_to_none=True)
            return None
        for p, has in zip(params, present.tolist()):
            p.grad = p.grad / total if has else None
    elif grads is None:
        return None
    params = [p for p in learner.parameters() if p.grad is not None]
    max_norm = clip_grad if clip_grad > 0 else math.inf
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0


def take_rounds(
    streams: Sequence[Iterator[MetaGradient]],
    step: MetaStep,
    *,
    rounds: int | None = None,
    step_without_gradient: bool = False,
    clip_each: float = 0.0,
) -> dict[str, float]:
    """Round after round, the next window of every stream still running, and one ``step``
    with the mean of their gradients and meta-losses.

    Args:
        streams: one estimator stream per task.
        step: the meta-step.
        rounds: how many rounds (the same on every process of a distributed run, so that all
            join the same all-reduces); ``None``: until every stream is exhausted.
        step_without_gradient: call ``step(None, 0.0)`` for a round without a usable window
            (a distributed run's rank still takes part); otherwise such a round is skipped.
        clip_each: if positive, each window's gradient is first clipped to this norm
            (:func:`~learned_opt.outer.estimators.clip_estimate`), so that no one task's
            gradient dominates the mean.

    Returns:
        ``{"meta_loss", "grad_norm"}`` (means over the steps; the meta-loss over those with a
        usable window), ``"diverged"`` (windows after which a task stopped), ``"skipped"``
        (steps not taken), ``"rounds"`` (steps), and per round the sum of the usable windows'
        meta-losses and their number (``"round_loss_sums"``, ``"round_windows"``: a distributed
        run's mean over all processes' windows is made of them).
    """
    active = list(streams)
    meta_losses: list[float] = []
    round_sums: list[float] = []  # each round's usable meta-losses, summed, and their number
    round_windows: list[float] = []
    norms: list[float] = []
    diverged = skipped = done = 0
    while active if rounds is None else done < rounds:
        done += 1
        estimates = []
        for s in list(active):
            e = next(s, None)
            if e is None:
                active.remove(s)
                continue
            estimates.append(clip_estimate(e, clip_each) if clip_each > 0 else e)
            diverged += e.diverged
        grads = average_gradients(estimates)
        if grads is None and not step_without_gradient:
            continue
        usable = [e.meta_loss for e in estimates if e.grads is not None]
        loss = float(np.mean(usable)) if usable else 0.0
        norm, stepped = step(grads, loss, len(usable))
        if usable:  # (a round this process only takes part in has no meta-loss of its own)
            meta_losses.append(loss)
        round_sums.append(float(np.sum(usable)) if usable else 0.0)
        round_windows.append(float(len(usable)))
        norms.append(norm)
        skipped += not stepped
    return {
        "meta_loss": float(np.mean(meta_losses)) if meta_losses else math.nan,
        "round_loss_sums": round_sums,
        "round_windows": round_windows,
        "grad_norm": float(np.mean(norms)) if norms else math.nan,
        "diverged": float(diverged),
        "skipped": float(skipped),
        "rounds": float(len(norms)),
    }


def meta_train_iteration(
    learner: MetaLearner,
    meta_opt: torch.optim.Optimizer,
    streams: Sequence[Iterator[MetaGradient]],
    *,
    clip_grad: float = 1.0,
    clip_each: float = 0.0,
) -> dict[str, float]:
    """One meta-training iteration driven by estimator streams (one per task): the loop of
    ``MetaTrainer.train_iteration`` without the trainer (no rollback, learning-rate schedule,
    logging or checkpoints). A round whose gradient norm or mean meta-loss is not finite is
    skipped. With the trainer's streams it takes the same steps (tested).

    Args:
        clip_grad: the norm the mean gradient is clipped to (``0``: none).
        clip_each: as in :func:`take_rounds` (the trainer's ``clip_grad_per_task``).

    Returns:
        as :func:`take_rounds`.
    """

    def step(grads: list[Tensor | None] | None, meta_loss: float, count: int) -> tuple[float, bool]:
        norm = write_meta_gradient(learner, meta_opt, grads, clip_grad, count)
        if norm is None or not (math.isfinite(norm) and math.isfinite(meta_loss)):
            meta_opt.zero_grad(set_to_none=True)
            return norm, False
        meta_opt.step()
        return norm, True

    return take_rounds(streams, step, clip_each=clip_each)
