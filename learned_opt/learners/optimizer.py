"""The learned optimizer as a meta-learner: phi = T steps of the learned rule from an init."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..rules import RuleState, UpdateRule
from ..rules.base import checked_output
from ..tasks import Batch, FlatSpec, Task
from .base import LearnedInit, MetaLearner

__all__ = ["STEP_SIZES", "OptimizerLearner", "OptimizerState"]

#: The learned step-size options of :class:`OptimizerLearner`.
STEP_SIZES = (None, "tensor", "coordinate")


@dataclass
class OptimizerState:
    """Inner state of a learned-optimizer unroll.

    Attributes:
        params: the optimizee's parameters as one flat vector (see :class:`FlatSpec`).
        rule_state: the rule's per-coordinate state over that vector.
        spec: how the flat vector maps to named tensors.
        step: inner steps taken.
    """

    params: Tensor
    rule_state: RuleState
    spec: FlatSpec
    step: int = 0


class OptimizerLearner(MetaLearner):
    """A learned update rule unrolled on a task (Andrychowicz et al., 2016).

    Each inner step computes the training loss at phi_t, its gradient, and
    ``phi_{t+1} = phi_t + lr * rule(grad)``. With ``second_order=False`` (the paper's choice) the
    gradient is treated as a constant: the meta-gradient flows through the rule's outputs and
    the direct path phi_t -> phi_{t+1}, but not through the Hessian.

    With ``init_model``, phi_0 is meta-learned as well (theta = the rule and the initialization),
    as in the LSTM meta-learner of Ravi & Larochelle (2017) for few-shot learning; otherwise every
    unroll starts from the task's own random initialization.

    Args:
        rule: the update rule (its parameters are theta).
        second_order: backpropagate through the optimizee's gradients (``create_graph=True``).
        lr: multiplier on the rule's update (as in the drop-in optimizer).
        init_model: meta-learn an initialization of this model's parameters (the tasks' model).
        init_seed: seed of that initialization's starting values.
        step_sizes: with ``init_model``, also meta-learn step sizes that multiply the rule's
            update (as log-scales starting at 0, i.e. at 1): ``"tensor"``, one per parameter
            tensor, or ``"coordinate"``, one per coordinate (Meta-SGD's learned inner learning
            rates, here on the learned rule's update). The coordinatewise rule sees only a
            coordinate's gradient history, so it cannot tell a first layer's weight from a last
            layer's bias; from a learned initialization, few-shot learning needs different step
            sizes for them. ``None``: the rule's update as it is.
    """

    def __init__(
        self,
        rule: UpdateRule,
        *,
        second_order: bool = False,
        lr: float = 1.0,
        init_model: nn.Module | None = None,
        init_seed: int = 0,
        step_sizes: str | None = None,
    ) -> None:
        super().__init__()
        self.rule = rule
        self.second_order = second_order
        self.lr = lr
        self.init = LearnedInit(init_model, init_seed) if init_model is not None else None
        if step_sizes not in STEP_SIZES:
            raise ValueError(f"Unknown step_sizes {step_sizes!r}; expected one of {STEP_SIZES}")
        if step_sizes is not None and self.init is None:
            raise ValueError("step_sizes needs init_model (a fixed set of parameter tensors)")
        self.step_sizes = step_sizes
        self.log_step_sizes: nn.Parameter | None = None
        if self.init is not None and step_sizes is not None:
            sized = list(self.init.values())
            n = len(sized) if step_sizes == "tensor" else sum(p.numel() for p in sized)
            self.log_step_sizes = nn.Parameter(torch.zeros(n))

    def drop_in(self) -> tuple[UpdateRule, float] | None:
        """The rule and multiplier with which the drop-in optimizer
        (:class:`~learned_opt.LearnedOptimizer`) runs exactly what this learner computes from a
        task's own initialization, or ``None`` when the learner also meta-learns an
        initialization or step sizes (the drop-in optimizer has neither)."""
        return (self.rule, self.lr) if self.init is None else None

    def settings(self) -> dict[str, Any]:
        return {"second_order": self.second_order, "lr": self.lr, "step_sizes": self.step_sizes}

    def _scale(self, update: Tensor, spec: FlatSpec) -> Tensor:
        """``lr`` times the update, times the learned step sizes (if any)."""
        update = self.lr * update
        if self.log_step_sizes is None:
            return update
        sizes = self.log_step_sizes.exp().to(update)
        if self.step_sizes == "tensor":
            counts = torch.tensor(spec.numels, device=update.device)
            sizes = sizes.repeat_interleave(counts, output_size=spec.numel)
        return update * sizes

    def init_state(self, task: Task, generator: torch.Generator) -> OptimizerState:
        if self.init is not None:
            self.init.check(task)
            named = self.init.values_by_name()
            spec = FlatSpec(named)
            flat = spec.flatten(named)  # differentiable in the learned initialization
            return OptimizerState(flat, self._rule_state(spec, flat), spec)
        named = task.init_params(generator)
        spec = FlatSpec(named)
        flat = spec.flatten(named).detach().requires_grad_(True)
        return OptimizerState(flat, self._rule_state(spec, flat), spec)

    def _rule_state(self, spec: FlatSpec, flat: Tensor) -> RuleState:
        kwargs: dict = {}
        if self.rule.tensor_aware:  # the flat vector holds several tensors: say where each is
            kwargs["numels"] = spec.numels
        if self.rule.reads_shape:  # and what shape each has
            kwargs["shapes"] = spec.shapes
        return self.rule.init_state(spec.numel, like=flat, **kwargs)  # type: ignore[call-arg]

    def step(
        self, task: Task, state: OptimizerState, batch: Batch, *, differentiable: bool = True
    ) -> tuple[OptimizerState, Tensor]:
        phi = state.params
        if not phi.requires_grad:
            phi = phi.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = task.loss(state.spec.unflatten(phi), batch)
            create_graph = differentiable and self.second_order
            (grad,) = torch.autograd.grad(
                loss, phi, create_graph=create_graph, retain_graph=differentiable
            )
        with contextlib.nullcontext() if differentiable else torch.no_grad():
            output = self.rule(grad, state.rule_state)
            update, rule_state = checked_output(self.rule, output, phi.numel())
            new_phi = phi + self._scale(update.to(phi.dtype), state.spec)
        if not differentiable:
            new_phi.requires_grad_(True)
            loss = loss.detach()
        return OptimizerState(new_phi, rule_state, state.spec, state.step + 1), loss

    def evaluate(self, task: Task, state: OptimizerState, batch: Batch) -> Tensor:
        return task.loss(state.spec.unflatten(state.params), batch)

    def detach_state(self, state: OptimizerState) -> OptimizerState:
        return OptimizerState(
            state.params.detach().requires_grad_(True),
            {k: v.detach() for k, v in state.rule_state.items()},
            state.spec,
            state.step,
        )

    def params_of(self, task: Task, state: OptimizerState) -> dict[str, Tensor]:
        return state.spec.unflatten(state.params)
