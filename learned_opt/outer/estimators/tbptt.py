"""Truncated backpropagation through time."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from ...learners import MetaLearner
from ...tasks import Task
from ..unroll import UnrollSpec, unroll
from .base import Estimator, MetaGradient, meta_parameters

__all__ = ["TBPTTEstimator"]


class TBPTTEstimator(Estimator):
    """Truncated backpropagation through time: each window's meta-loss is backpropagated through
    the window's inner steps (the state is detached between windows), the trainer's default
    (``MetaTrainConfig(estimator="tbptt")``). First or second order is the learner's choice
    (``OptimizerLearner(second_order=...)``).

    Args:
        checkpoint_segment: gradient checkpointing of the window, passed to
            :func:`~learned_opt.outer.unroll.unroll` as it is (which validates it; e.g.
            ``MetaTrainConfig.checkpoint_segment()``); ``None``: off.
    """

    name = "tbptt"

    def __init__(self, checkpoint_segment: Any = None) -> None:
        self.checkpoint_segment = checkpoint_segment

    def unroll(
        self,
        learner: MetaLearner,
        task: Task,
        generator: torch.Generator,
        spec: UnrollSpec,
        *,
        reference: MetaLearner | None = None,
    ) -> Iterator[MetaGradient]:
        params = meta_parameters(learner)
        windows = unroll(
            learner,
            task,
            generator,
            spec,
            reference=reference,
            checkpoint_segment=self.checkpoint_segment,
        )
        for w in windows:
            grads: list[Tensor | None] | None = None
            loss = math.nan
            if w.meta_loss is not None:
                loss = float(w.meta_loss.detach())
                if w.meta_loss.requires_grad:
                    grads = list(torch.autograd.grad(w.meta_loss, params, allow_unused=True))
                else:
                    grads = [None] * len(params)
            yield MetaGradient(grads, loss, w.train_losses, w.start, w.end, w.diverged)

    def config(self) -> dict[str, Any]:
        segment = self.checkpoint_segment
        if isinstance(segment, tuple):
            segment = list(segment)
        return {"name": self.name, "checkpoint_segment": segment}
