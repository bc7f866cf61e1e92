"""Meta-gradient estimators behind one interface: truncated backpropagation and (persistent)
evolution strategies.

Meta-training unrolls a task for T inner steps in truncation windows of K steps and takes one
meta-step per window. An :class:`Estimator` turns one task's unroll
(``estimator.unroll(learner, task, generator, spec)``, the same arguments as
:func:`~learned_opt.outer.unroll.unroll`) into a stream of per-window meta-gradient estimates,
:class:`MetaGradient` (one gradient tensor per meta-parameter, in ``learner.parameters()``
order). The stream is lazy: window w+1 is computed only when asked for, *after* the consumer
has taken its meta-step, so it runs with the updated theta, exactly like the windows of
:func:`~learned_opt.outer.unroll.unroll`.

- :class:`TBPTTEstimator` (``"tbptt"``): backpropagation through each window.
- :class:`PESEstimator` (``"pes"``): persistent evolution strategies, unbiased over the whole
  horizon, memory independent of K and T; ``"es"``: the same with ``persistent=False``,
  antithetic truncated ES.

:func:`~learned_opt.outer.rounds.meta_train_iteration` drives the streams of one batch of tasks
(the loop of :class:`~learned_opt.outer.trainer.MetaTrainer`, without the trainer).
"""

from __future__ import annotations

from typing import Any

from .base import (
    Estimator,
    MetaGradient,
    average_gradients,
    clip_estimate,
    meta_parameters,
    set_gradients,
)
from .pes import PESEstimator, PESUnroll
from .tbptt import TBPTTEstimator

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "MetaGradient",
    "PESEstimator",
    "PESUnroll",
    "TBPTTEstimator",
    "average_gradients",
    "clip_estimate",
    "build_estimator",
    "meta_parameters",
    "set_gradients",
]

#: Estimators by name: ``"es"`` is :class:`PESEstimator` with ``persistent=False``.
ESTIMATORS: dict[str, tuple[type[Estimator], dict[str, Any]]] = {
    "tbptt": (TBPTTEstimator, {}),
    "pes": (PESEstimator, {}),
    "es": (PESEstimator, {"persistent": False}),
}


def build_estimator(name: str, **kwargs: Any) -> Estimator:
    """An estimator by name (:data:`ESTIMATORS`) with keyword overrides of its defaults."""
    if name not in ESTIMATORS:
        raise ValueError(f"Unknown estimator {name!r}; expected one of {sorted(ESTIMATORS)}")
    cls, defaults = ESTIMATORS[name]
    return cls(**{**defaults, **kwargs})
