"""Random rescaling of tasks' parameters and losses, a meta-training augmentation.

A learned optimizer meta-trained on a handful of tasks learns their scales: how large the
gradients are, how far the parameters must move. Metz et al. (2020, "Tasks, stability,
architecture, and compute: training more effective learned optimizers") reparameterize every
meta-training task with random per-task scales, so that only scale-free behaviour pays off.
:class:`RescaledFamily` does this as a task-family wrapper, with no change to the trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .base import Task, TaskFamily

__all__ = ["ParamScaled", "RescaledFamily", "log_uniform"]


def log_uniform(low: float, high: float, generator: torch.Generator) -> float:
    """A draw from the log-uniform distribution on ``[low, high]`` (``low == high``: that value)."""
    if not 0 < low <= high:
        raise ValueError(f"Invalid log-uniform range: [{low}, {high}] (need 0 < low <= high)")
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    return math.exp(math.log(low) + u * (math.log(high) - math.log(low)))


class ParamScaled(nn.Module):
    """``inner`` evaluated at ``scale`` times the parameters it is given.

    The wrapper holds ``inner``'s own child modules and top-level parameters under the same names,
    so it has exactly ``inner``'s parameter names: ``functional_call(wrapper, params, (x,))``
    computes ``functional_call(inner, {k: scale * v}, (x,))``. Buffers are not scaled.
    """

    def __init__(self, inner: nn.Module, scale: float) -> None:
        super().__init__()
        object.__setattr__(self, "inner", inner)  # not a submodule: no "inner." prefix
        for name, child in inner.named_children():
            self.add_module(name, child)
        for name, param in inner.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.scale = float(scale)
        self._names = [n for n, _ in inner.named_parameters()]

    def _current(self, name: str) -> Tensor:
        """The tensor now at ``name`` (the one ``functional_call`` swapped in, if any)."""
        owner, _, leaf = name.rpartition(".")
        return getattr(self.get_submodule(owner) if owner else self, leaf)

    def forward(self, *args: Any) -> Any:
        scaled = {n: self._current(n) * self.scale for n in self._names}
        return functional_call(self.inner, scaled, args)


def _scaled_loss(loss_fn: Callable[[Tensor, Tensor], Tensor], scale: float) -> Callable:
    def loss(output: Tensor, target: Tensor) -> Tensor:
        return loss_fn(output, target) * scale

    return loss


class RescaledFamily(TaskFamily):
    r"""Tasks of ``family`` with a random parameter scale c and loss scale s per task.

    Each sampled task draws :math:`c \sim \mathrm{LogUniform}(\text{param\_scale\_range})` and
    :math:`s \sim \mathrm{LogUniform}(\text{loss\_scale\_range})` and is reparameterized as

    .. math::
        \theta = c\,\theta', \qquad f'(\theta') = s\, f(c\,\theta'), \qquad
        \theta'_0 = \theta_0 / c,

    so the optimizer sees parameters :math:`\theta'` (c times smaller), gradients
    :math:`\nabla_{\theta'} f' = s\,c\,\nabla_\theta f` and losses s times larger, while the
    function computed at initialization is the original task's. The model is wrapped in
    :class:`ParamScaled` (same parameter names) and the loss function multiplied by s, so every
    learner sees the same rescaled task, whether it calls ``Task.loss`` or the model and the loss
    function itself.

    The inner task is drawn first, from the same generator, so ``RescaledFamily(f)`` and ``f``
    give the same tasks for the same generator, up to the scales.

    Args:
        family: the task family to rescale.
        param_scale_range: ``(low, high)`` of c (``(1, 1)``: no parameter rescaling).
        loss_scale_range: ``(low, high)`` of s (``(1, 1)``: no loss rescaling).
    """

    name = "rescaled"

    def __init__(
        self,
        family: TaskFamily,
        param_scale_range: tuple[float, float] = (0.1, 10.0),
        loss_scale_range: tuple[float, float] = (1e-3, 1e3),
    ) -> None:
        self.family = family
        self.param_scale_range = (float(param_scale_range[0]), float(param_scale_range[1]))
        self.loss_scale_range = (float(loss_scale_range[0]), float(loss_scale_range[1]))
        for low, high in (self.param_scale_range, self.loss_scale_range):
            if not 0 < low <= high < math.inf:
                raise ValueError(f"Invalid scale range: ({low}, {high}) (need 0 < low <= high)")

    def sample(self, generator: torch.Generator) -> Task:
        inner = self.family.sample(generator)
        c = log_uniform(*self.param_scale_range, generator)
        s = log_uniform(*self.loss_scale_range, generator)
        return rescale_task(inner, c, s)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family.config(),
            "param_scale_range": list(self.param_scale_range),
            "loss_scale_range": list(self.loss_scale_range),
        }


def rescale_task(task: Task, param_scale: float, loss_scale: float) -> Task:
    """``task`` reparameterized as ``theta = param_scale * theta'`` with its loss multiplied by
    ``loss_scale`` (see :class:`RescaledFamily`); the samplers are shared with ``task``."""
    if param_scale <= 0 or loss_scale <= 0:
        raise ValueError(f"Invalid scales: {param_scale}, {loss_scale} (must be > 0)")
    inner_init = task.init_fn

    def init_fn(gen: torch.Generator) -> dict[str, Tensor]:
        return {k: v / param_scale for k, v in inner_init(gen).items()}

    rescaled = Task(
        f"{task.name}[c={param_scale:.3g},s={loss_scale:.3g}]",
        ParamScaled(task.model, param_scale),
        _scaled_loss(task.loss_fn, loss_scale),
        init_fn,
        task.train,
        task.test,
    )
    rescaled.param_scale = param_scale  # type: ignore[attr-defined]
    rescaled.loss_scale = loss_scale  # type: ignore[attr-defined]
    return rescaled
