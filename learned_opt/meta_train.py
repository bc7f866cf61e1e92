"""Former import path of the meta-trainer, kept for code that imports it from here: the outer
loop is the package :mod:`learned_opt.outer` (public: ``learned_opt.MetaTrainer``,
``learned_opt.MetaTrainConfig``)."""

from __future__ import annotations

from .outer.checkpoints import TRAINER_FORMAT, find_checkpoints
from .outer.config import MetaTrainConfig
from .outer.trainer import MetaTrainer

__all__ = ["TRAINER_FORMAT", "MetaTrainConfig", "MetaTrainer", "find_checkpoints"]
