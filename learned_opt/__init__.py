"""learned_opt: learned optimizers for PyTorch.

The public API; everything else is an implementation detail.
"""

from __future__ import annotations

from . import kernels, pretrained
from .checkpoint import CheckpointError, WeightsMismatchError, load_rule, save_rule
from .higher_interop import DifferentiableLearnedOptimizer, register
from .learners import MAMLLearner, MetaLearner, OptimizerLearner, RNNLearner
from .lstm_optimizer import LSTMOptimizer
from .optim import LearnedOptimizer, NonFiniteGradientError
from .outer import (
    Estimator,
    MetaTrainConfig,
    MetaTrainer,
    PESEstimator,
    TBPTTEstimator,
    UnrollSpec,
    run_inner,
    unroll,
)
from .rules import (
    AdamRule,
    GeneralLSTMRule,
    LSTMCorrectedAdamConfig,
    LSTMCorrectedAdamRule,
    LSTMRule,
    ScheduledRule,
    SGDRule,
    UpdateRule,
)
from .tasks import MLPFamily, QuadraticFamily, Task, TaskFamily, make_family

__version__ = "0.1.0"

register()

__all__ = [
    "AdamRule",
    "CheckpointError",
    "DifferentiableLearnedOptimizer",
    "Estimator",
    "GeneralLSTMRule",
    "LSTMCorrectedAdamConfig",
    "LSTMCorrectedAdamRule",
    "LSTMOptimizer",
    "LSTMRule",
    "LearnedOptimizer",
    "MAMLLearner",
    "MLPFamily",
    "MetaLearner",
    "MetaTrainConfig",
    "MetaTrainer",
    "NonFiniteGradientError",
    "OptimizerLearner",
    "PESEstimator",
    "QuadraticFamily",
    "RNNLearner",
    "SGDRule",
    "ScheduledRule",
    "TBPTTEstimator",
    "Task",
    "TaskFamily",
    "UnrollSpec",
    "UpdateRule",
    "WeightsMismatchError",
    "load_rule",
    "make_family",
    "kernels",
    "pretrained",
    "run_inner",
    "save_rule",
    "unroll",
    "__version__",
]
