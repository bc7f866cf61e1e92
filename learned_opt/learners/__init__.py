"""Meta-learners (choices of f_theta) behind one interface."""

from __future__ import annotations

from .base import MetaLearner
from .maml import MAMLLearner, MAMLState
from .optimizer import OptimizerLearner, OptimizerState
from .rnn import RNNLearner, RNNState

__all__ = [
    "MAMLLearner",
    "MAMLState",
    "MetaLearner",
    "OptimizerLearner",
    "OptimizerState",
    "RNNLearner",
    "RNNState",
]
