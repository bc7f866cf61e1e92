"""MAML / Meta-SGD as a meta-learner: phi = a few SGD steps from a learned initialization."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import higher
import torch
from torch import Tensor, nn

from ..tasks import Batch, Task
from .base import LearnedInit, MetaLearner

__all__ = ["MAMLLearner", "MAMLState"]


def _key(name: str) -> str:
    """A parameter name usable as a module attribute (``"0.weight"`` -> ``"0-weight"``)."""
    return name.replace(".", "-")


@dataclass
class MAMLState:
    """Inner state of a MAML unroll.

    Attributes:
        params: the adapted parameters phi, by the task model's parameter names.
        step: inner steps taken.
    """

    params: dict[str, Tensor]
    step: int = 0


class MAMLLearner(MetaLearner):
    """Model-agnostic meta-learning (Finn et al., 2017), with Meta-SGD learning rates (Li et al.,
    2017).

    theta is a learned initialization of the task model's parameters and, with ``learn_lrs``, a
    learned inner learning rate per coordinate (log-parameterized, so it stays positive). Each
    inner step is one SGD step on the support batch::

        phi_{t+1} = phi_t - exp(log_lr) * grad L_support(phi_t)

    :meth:`step` takes one such step, so the generic :func:`~learned_opt.outer.unroll.unroll` with
    ``horizon = truncation = inner_steps`` and ``objective="test"`` computes MAML's
    meta-objective: the query loss after adaptation, differentiable in theta. With
    ``first_order`` the inner gradients are constants (FOMAML): the meta-gradient skips the
    Hessian terms.

    :meth:`adapt_with_higher` runs the same adaptation with ``higher.innerloop_ctx`` and its
    differentiable SGD; it gives the same parameters and meta-gradients as the functional path.

    Args:
        model: the task model whose parameters are meta-learned (e.g. ``family.model``); only its
            parameter names and shapes are used. Batch norm in it must use batch statistics
            (``track_running_stats=False``, as in the MAML paper).
        inner_steps: the number of adaptation steps (the default of :meth:`adapt` and
            :meth:`adapt_with_higher`): the meta-trainer refuses a configuration whose horizon
            (or held-out evaluation's) is another.
        inner_lr: initial inner learning rate.
        first_order: drop second derivatives (FOMAML).
        learn_lrs: meta-learn the per-coordinate learning rates (Meta-SGD); otherwise they stay
            at ``inner_lr`` (a buffer, not a parameter).
        seed: seed of the initialization (PyTorch's default ``nn.Linear`` scheme).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_steps: int = 5,
        inner_lr: float = 0.01,
        first_order: bool = False,
        learn_lrs: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if inner_steps < 1 or inner_lr <= 0:
            raise ValueError(f"Invalid inner_steps/inner_lr: {inner_steps}/{inner_lr}")
        self.inner_steps = inner_steps
        self.inner_lr = inner_lr
        self.first_order = first_order
        self.learn_lrs = learn_lrs
        self.init = LearnedInit(model, seed)
        self.names = self.init.names
        log_lrs = {
            _key(n): torch.full_like(v, math.log(inner_lr))
            for n, v in self.init.values_by_name().items()
        }
        if learn_lrs:
            self.log_lr: nn.Module = nn.ParameterDict(
                {k: nn.Parameter(v) for k, v in log_lrs.items()}
            )
        else:
            self.log_lr = nn.Module()
            for k, v in log_lrs.items():
                self.log_lr.register_buffer(k, v)

    @property
    def second_order(self) -> bool:
        """Whether the meta-gradient goes through the inner gradients (not ``first_order``)."""
        return not self.first_order

    def settings(self) -> dict[str, Any]:
        settings = {
            "inner_steps": self.inner_steps,
            "first_order": self.first_order,
            "learn_lrs": self.learn_lrs,
        }
        if not self.learn_lrs:  # a fixed rate: a checkpoint's buffer holds it, so a resume
            settings["inner_lr"] = self.inner_lr  # must be built with the same
        return settings

    def lrs(self) -> dict[str, Tensor]:
        """The inner learning rates, by parameter name (differentiable in theta)."""
        return {n: getattr(self.log_lr, _key(n)).exp() for n in self.names}

    def init_state(self, task: Task, generator: torch.Generator) -> MAMLState:
        """The learned initialization (``generator`` is unused: the start is theta itself)."""
        self.init.check(task)
        return MAMLState(self.init.values_by_name())

    def step(
        self, task: Task, state: MAMLState, batch: Batch, *, differentiable: bool = True
    ) -> tuple[MAMLState, Tensor]:
        if len(batch[0]) == 0:
            raise ValueError(f"Task {task.name}: an empty batch; MAML adapts on support examples")
        params = state.params
        if not differentiable:
            params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        else:  # a part of the initialization held fixed (requires_grad=False): still adapted
            params = {n: p if p.requires_grad else p.detach().requires_grad_(True)
                      for n, p in params.items()}  # fmt: skip
        with torch.enable_grad():
            loss = task.loss(params, batch)
            grads = torch.autograd.grad(
                loss,
                list(params.values()),
                create_graph=differentiable and not self.first_order,
                retain_graph=differentiable,
            )
        lrs = self.lrs()
        if differentiable:
            new = {n: p - lrs[n] * g for (n, p), g in zip(params.items(), grads)}
        else:
            with torch.no_grad():
                new = {n: p - lrs[n] * g for (n, p), g in zip(params.items(), grads)}
            new = {n: p.requires_grad_(True) for n, p in new.items()}
            loss = loss.detach()
        return MAMLState(new, state.step + 1), loss

    def evaluate(self, task: Task, state: MAMLState, batch: Batch) -> Tensor:
        return task.loss(state.params, batch)

    def detach_state(self, state: MAMLState) -> MAMLState:
        params = {n: p.detach().requires_grad_(True) for n, p in state.params.items()}
        return MAMLState(params, state.step)

    def params_of(self, task: Task, state: MAMLState) -> dict[str, Tensor]:
        return dict(state.params)

    def adapt(
        self, task: Task, steps: int | None = None, *, differentiable: bool = True
    ) -> dict[str, Tensor]:
        """Adapt to ``task``'s whole support set with ``steps`` functional SGD steps."""
        state = self.init_state(task, torch.Generator())
        for _ in range(self.inner_steps if steps is None else steps):
            state, _ = self.step(task, state, task.train.full(), differentiable=differentiable)
        return state.params

    def adapt_with_higher(self, task: Task, steps: int | None = None) -> dict[str, Tensor]:
        """:meth:`adapt`, written with ``higher.innerloop_ctx`` and its differentiable SGD.

        A copy of the task model holds theta's initialization as its own parameters, so that
        ``copy_initial_weights=False`` puts theta at the start of higher's gradient tape; each
        parameter has its own param group, whose learning rate is overridden with the learned
        (tensor) rate. For first-order MAML the inner gradients are detached.

        Returns:
            the adapted parameters by name, differentiable in theta.
        """
        self.init.check(task)
        model = copy.deepcopy(task.model)
        modules = dict(model.named_modules())
        for n in self.names:
            owner, _, leaf = n.rpartition(".")
            modules[owner]._parameters[leaf] = self.init[_key(n)]
        params = [self.init[_key(n)] for n in self.names]
        opt = torch.optim.SGD([{"params": [p]} for p in params], lr=1.0)
        lrs = self.lrs()
        override = {"lr": [lrs[n] for n in self.names]}
        callback = (lambda gs: [g.detach() for g in gs]) if self.first_order else None
        x, y = task.train.full()
        with higher.innerloop_ctx(model, opt, copy_initial_weights=False, override=override) as (
            fmodel,
            diffopt,
        ):
            for _ in range(self.inner_steps if steps is None else steps):
                diffopt.step(task.loss_fn(fmodel(x), y), grad_callback=callback)
            fast = list(fmodel.parameters())
        return dict(zip(self.names, fast))
