"""Meta-learners (choices of f_theta) behind one interface."""

from __future__ import annotations

from .base import MetaLearner
from .optimizer import OptimizerLearner, OptimizerState

__all__ = ["MetaLearner", "OptimizerLearner", "OptimizerState"]
