"""The meta-learner interface: f_theta, one choice of which is a learned optimizer."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..tasks import Batch, Task, uniform_init

__all__ = ["LearnedInit", "MetaLearner"]


class MetaLearner(nn.Module):
    """f_theta: reads a task's training data and produces parameters phi for it.

    theta are the module's parameters; the inner state (phi and whatever the learner carries
    along) is explicit data, never stored on the module. The meta-trainer drives any learner with
    the same three calls:

    - :meth:`init_state` starts the inner state for a task;
    - :meth:`step` consumes one training batch and returns the new state and the training loss
      (differentiable in theta when ``differentiable``: the meta-loss of the ``"train"``
      objective backpropagates through it after the step, so a gradient taken inside the step
      keeps the graph, ``retain_graph=differentiable``);
    - :meth:`evaluate` scores a state on held-out data.

    :meth:`detach_state` cuts the graph between truncation windows; :meth:`meta_param_groups`
    tells the meta-optimizer which parts of theta take smaller steps.
    """

    def init_state(self, task: Task, generator: torch.Generator) -> Any:
        raise NotImplementedError(f"{type(self).__qualname__} must implement init_state()")

    def step(
        self, task: Task, state: Any, batch: Batch, *, differentiable: bool = True
    ) -> tuple[Any, Tensor]:
        raise NotImplementedError(f"{type(self).__qualname__} must implement step()")

    def evaluate(self, task: Task, state: Any, batch: Batch) -> Tensor:
        raise NotImplementedError(f"{type(self).__qualname__} must implement evaluate()")

    def detach_state(self, state: Any) -> Any:
        raise NotImplementedError(f"{type(self).__qualname__} must implement detach_state()")

    def params_of(self, task: Task, state: Any) -> dict[str, Tensor]:
        """The optimizee parameters phi held by ``state``, by name."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement params_of()")

    def settings(self) -> dict[str, Any]:
        """The learner's own settings that change what it computes without changing its
        parameters' shapes (e.g. MAML's ``first_order``), as plain data: a checkpoint records
        them and a resume refuses a learner set otherwise. By default none."""
        return {}

    def meta_param_groups(self) -> list[dict[str, Any]]:
        """theta as the meta-optimizer's parameter groups, each ``{"params": [...],
        "lr_scale": s}``: the group's meta learning rate is ``s`` times the configured one.
        Every parameter in exactly one group; by default one group at scale 1."""
        return [{"params": list(self.parameters()), "lr_scale": 1.0}]


class LearnedInit(nn.ParameterDict):
    """A meta-learned initialization of a task model's parameters (part of theta).

    Keys are the model's parameter names with ``"."`` replaced by ``"-"`` (module attribute
    names cannot contain dots), so a learner's ``state_dict`` reads ``init.0-weight``, ...

    Args:
        model: the task model; only its parameter names and shapes are used.
        seed: seed of the starting values (PyTorch's default layer initialization).
    """

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        refuse_running_statistics(model, "A learned initialization's model")
        init = uniform_init(model, torch.Generator().manual_seed(seed))
        if any("-" in n for n in init):
            raise ValueError(f"Parameter names must not contain '-': {list(init)}")
        # A list of pairs keeps the model's order (ParameterDict sorts the keys of a plain dict).
        super().__init__([(n.replace(".", "-"), nn.Parameter(v)) for n, v in init.items()])

    @property
    def names(self) -> list[str]:
        """The task model's parameter names, in order."""
        return [k.replace("-", ".") for k in self.keys()]

    def values_by_name(self) -> dict[str, Tensor]:
        """The initialization by the model's parameter names (differentiable in theta)."""
        return {k.replace("-", "."): v for k, v in self.items()}

    def check(self, task: Task) -> None:
        """Raise ``ValueError`` if ``task``'s model has other parameters than this init, by name
        or by shape (a model of another size would run with this init's sizes)."""
        found = dict(task.model.named_parameters())
        if list(found) != self.names:
            raise ValueError(
                f"Task {task.name} has parameters {list(found)}, expected {self.names}"
            )
        for name, value in self.values_by_name().items():
            if found[name].shape != value.shape:
                raise ValueError(
                    f"Task {task.name}'s parameter {name} has shape {tuple(found[name].shape)}, "
                    f"the learned initialization {tuple(value.shape)}: build the learner for "
                    "this task's model"
                )


def refuse_running_statistics(module: nn.Module, what: str) -> None:
    """A ``ValueError`` if ``module`` keeps running statistics (batch norm with
    ``track_running_stats=True``): a learner runs it on every task's data, evaluations too, so
    they would mix tasks, and change state that belongs to theta."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._NormBase) and sub.track_running_stats:
            raise ValueError(
                f"{what} keeps running statistics ({name or 'the module'}: "
                f"{type(sub).__name__} with track_running_stats=True), which every task's "
                "data would update; use batch statistics (track_running_stats=False), as "
                "MAML does"
            )
