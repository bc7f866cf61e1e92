"""The outer loop of meta-learning, read top to bottom:

- :mod:`.config`: :class:`MetaTrainConfig`, everything that defines a run (the command line's
  ``meta-train`` options are derived from its fields);
- :mod:`.factory`: what a configuration builds (task families, rule, learner, estimator,
  meta-optimizer);
- :mod:`.unroll`: the inner loop in truncation windows (:class:`UnrollSpec`, :func:`unroll`),
  with :mod:`.grad_checkpoint` for gradient checkpointing of a window;
- :mod:`.estimators`: meta-gradient estimators sharing ``unroll(learner, task, generator,
  spec)``: truncated backpropagation, (persistent) evolution strategies;
- :mod:`.rounds`: one iteration, a meta-step per round of windows of a batch of tasks;
- :mod:`.trainer`: :class:`MetaTrainer`, the loop: meta-optimizer, clipping, held-out
  evaluation (:mod:`.held_out`), TensorBoard, checkpoints and resume (:mod:`.checkpoints`),
  rollback, distributed averaging.
"""

from __future__ import annotations

from .checkpoints import find_checkpoints
from .config import META_LR_SCHEDULES, MetaTrainConfig
from .estimators import (
    ESTIMATORS,
    Estimator,
    MetaGradient,
    PESEstimator,
    TBPTTEstimator,
    build_estimator,
)
from .rounds import meta_train_iteration
from .trainer import MetaTrainer
from .unroll import OBJECTIVES, UnrollSpec, Window, run_inner, unroll

__all__ = [
    "ESTIMATORS",
    "META_LR_SCHEDULES",
    "OBJECTIVES",
    "Estimator",
    "MetaGradient",
    "MetaTrainConfig",
    "MetaTrainer",
    "PESEstimator",
    "TBPTTEstimator",
    "UnrollSpec",
    "Window",
    "build_estimator",
    "find_checkpoints",
    "meta_train_iteration",
    "run_inner",
    "unroll",
]
