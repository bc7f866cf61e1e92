"""Random quadratics f(theta) = ||W theta - y||^2 (Andrychowicz et al., 2016, Section 3.1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import BatchSampler, Task, TaskFamily

__all__ = ["QuadraticFamily", "QuadraticModel"]


class QuadraticModel(nn.Module):
    """``forward(W) = W @ theta``; the loss against ``y`` is the squared norm of the residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(dim))

    def forward(self, w: Tensor) -> Tensor:
        return w @ self.theta


def _sum_squares(pred: Tensor, target: Tensor) -> Tensor:
    return (pred - target).pow(2).sum()


class QuadraticFamily(TaskFamily):
    """Quadratics ``||W theta - y||^2`` with W, y and the initial theta i.i.d. standard normal.

    The whole function is one deterministic "batch", so the training and held-out losses coincide.

    Args:
        dim: the dimension of theta (10 in the paper).
        dtype: floating-point type of the task's tensors.
    """

    name = "quadratic"

    def __init__(self, dim: int = 10, dtype: torch.dtype = torch.float32) -> None:
        if dim < 1:
            raise ValueError(f"Invalid dimension: {dim}")
        self.dim = dim
        self.dtype = dtype

    def sample(self, generator: torch.Generator) -> Task:
        d = self.dim
        w = torch.randn(d, d, generator=generator, dtype=self.dtype)
        y = torch.randn(d, generator=generator, dtype=self.dtype)
        task_seed = int(torch.randint(2**62, (1,), generator=generator))
        data = BatchSampler(w, y, None, torch.Generator().manual_seed(task_seed))

        def init_fn(gen: torch.Generator) -> dict[str, Tensor]:
            return {"theta": torch.randn(d, generator=gen, dtype=self.dtype)}

        return Task(f"quadratic(d={d})", QuadraticModel(d), _sum_squares, init_fn, data, data)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim}
