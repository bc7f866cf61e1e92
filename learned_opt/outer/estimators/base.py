"""The interface of meta-gradient estimators and what they produce."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...learners import MetaLearner
from ...tasks import Task
from ..unroll import UnrollSpec

__all__ = [
    "Estimator",
    "MetaGradient",
    "average_gradients",
    "clip_estimate",
    "meta_parameters",
    "set_gradients",
]


@dataclass
class MetaGradient:
    """One truncation window's meta-gradient estimate.

    Attributes:
        grads: one tensor (or ``None``: no dependence) per meta-parameter, in the order of
            :func:`meta_parameters`; ``None`` as a whole when the window is unusable (the task
            diverged before any step).
        meta_loss: the window's meta-loss at theta (PES: the mean over the antithetic particles).
        train_losses: the inner training loss of each step of the window (detached; PES: the
            particles' mean).
        start, end: inner steps covered, ``[start, end)``.
        diverged: the unroll stops after this window (the inner loss became non-finite or
            exploded).
        info: estimator-specific diagnostics (plain numbers).
    """

    grads: list[Tensor | None] | None
    meta_loss: float
    train_losses: Tensor
    start: int
    end: int
    diverged: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def meta_parameters(learner: nn.Module) -> list[nn.Parameter]:
    """The meta-parameters theta: the learner's parameters that require grad, in order."""
    return [p for p in learner.parameters() if p.requires_grad]


def clip_estimate(estimate: MetaGradient, max_norm: float) -> MetaGradient:
    """``estimate`` with its gradients scaled to a total norm of at most ``max_norm`` (as
    ``torch.nn.utils.clip_grad_norm_`` scales); unchanged if unusable or its norm is not
    finite (the meta-step then skips the round as it would have)."""
    if estimate.grads is None:
        return estimate
    present = [g for g in estimate.grads if g is not None]
    if not present:
        return estimate
    norm = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in present])))
    if not math.isfinite(norm) or norm <= max_norm:
        return estimate
    scale = max_norm / (norm + 1e-6)
    grads = [None if g is None else g * scale for g in estimate.grads]
    return dataclasses.replace(estimate, grads=grads)


def average_gradients(estimates: Sequence[MetaGradient]) -> list[Tensor | None] | None:
    """The mean of the usable estimates' gradients (what backpropagating the mean of their
    meta-losses gives): per parameter, ``None`` counts as zero unless every estimate has
    ``None``. ``None`` when no estimate is usable."""
    usable = [e.grads for e in estimates if e.grads is not None]
    if not usable:
        return None
    out: list[Tensor | None] = []
    for per_param in zip(*usable):
        present = [g for g in per_param if g is not None]
        out.append(torch.stack(present).sum(0) / len(usable) if present else None)
    return out


def set_gradients(learner: nn.Module, grads: Sequence[Tensor | None]) -> None:
    """Write ``grads`` into ``p.grad`` of :func:`meta_parameters` (``None`` leaves no grad)."""
    params = meta_parameters(learner)
    if len(grads) != len(params):
        raise ValueError(f"{len(grads)} gradients for {len(params)} meta-parameters")
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.detach().to(p.dtype).clone()


class Estimator:
    """A meta-gradient estimator: turns a task's unroll into per-window gradient estimates.

    Subclasses implement :meth:`unroll` and :meth:`config`.
    """

    #: Name under which :func:`~learned_opt.outer.estimators.build_estimator` finds the class.
    name: str = ""

    def unroll(
        self,
        learner: MetaLearner,
        task: Task,
        generator: torch.Generator,
        spec: UnrollSpec,
        *,
        reference: MetaLearner | None = None,
    ) -> Iterator[MetaGradient]:
        """A lazy stream of one :class:`MetaGradient` per truncation window of ``task``.

        Arguments as for :func:`~learned_opt.outer.unroll.unroll`; ``generator`` draws the
        inner state (and, for stochastic estimators, their noise). Each window is computed with
        the meta-parameters as they are when it is requested. ``reference`` (the loss-averse
        objective relative to a reference learner) is supported by backpropagation only.
        """
        raise NotImplementedError

    def meta_gradient(
        self,
        learner: MetaLearner,
        task: Task,
        generator: torch.Generator,
        spec: UnrollSpec,
        *,
        reference: MetaLearner | None = None,
    ) -> MetaGradient:
        """The estimate for the whole unroll at fixed theta: the mean over usable windows of
        the window estimates, i.e. of the gradient of the mean window meta-loss (TBPTT: the
        truncated gradient; PES: unbiased for the full one)."""
        windows = list(self.unroll(learner, task, generator, spec, reference=reference))
        usable = [w for w in windows if w.grads is not None]
        losses = [w.train_losses for w in windows]
        return MetaGradient(
            average_gradients(windows),
            float(sum(w.meta_loss for w in usable) / len(usable)) if usable else math.nan,
            torch.cat(losses) if losses else torch.zeros(0),
            windows[0].start if windows else 0,
            windows[-1].end if windows else 0,
            any(w.diverged for w in windows),
            {"windows": len(windows), "usable_windows": len(usable)},
        )

    def config(self) -> dict[str, Any]:
        """JSON-serializable constructor arguments."""
        raise NotImplementedError
