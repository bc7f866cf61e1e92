"""The meta-learner interface: f_theta, one choice of which is a learned optimizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..tasks import Batch, Task

__all__ = ["MetaLearner"]


class MetaLearner(nn.Module):
    """f_theta: reads a task's training data and produces parameters phi for it.

    theta are the module's parameters; the inner state (phi and whatever the learner carries
    along) is explicit data, never stored on the module. The meta-trainer drives any learner with
    the same three calls:

    - :meth:`init_state` starts the inner state for a task;
    - :meth:`step` consumes one training batch and returns the new state and the training loss
      (differentiable in theta when ``differentiable``);
    - :meth:`evaluate` scores a state on held-out data.

    :meth:`detach_state` cuts the graph between truncation windows.
    """

    def init_state(self, task: Task, generator: torch.Generator) -> Any:
        raise NotImplementedError

    def step(
        self, task: Task, state: Any, batch: Batch, *, differentiable: bool = True
    ) -> tuple[Any, Tensor]:
        raise NotImplementedError

    def evaluate(self, task: Task, state: Any, batch: Batch) -> Tensor:
        raise NotImplementedError

    def detach_state(self, state: Any) -> Any:
        raise NotImplementedError

    def params_of(self, task: Task, state: Any) -> dict[str, Tensor]:
        """The optimizee parameters phi held by ``state``, by name."""
        raise NotImplementedError
