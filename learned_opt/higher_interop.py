"""Use learned rules inside ``higher.innerloop_ctx`` (Grefenstette et al., 2019).

Importing :mod:`learned_opt` registers :class:`DifferentiableLearnedOptimizer` with ``higher`` for
:class:`~learned_opt.optim.LearnedOptimizer` and :class:`~learned_opt.LSTMOptimizer`, so
existing higher-based code works unchanged::

    opt = learned_opt.LSTMOptimizer(model.parameters())
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for x, y in batches:
            diffopt.step(loss_fn(fmodel(x), y))

The differentiable step applies the same rule, with the same per-parameter state layout, as the
drop-in optimizer, so both follow the same trajectory. By default the optimizer's (frozen) rule is
used; construct
``DifferentiableLearnedOptimizer(opt, params, rule=trainable_rule)`` to backpropagate into theta.
"""

from __future__ import annotations

from typing import Any

import higher
import torch

from .lstm_optimizer import LSTMOptimizer
from .optim import LearnedOptimizer, _compute_dtype
from .rules import UpdateRule

__all__ = ["DifferentiableLearnedOptimizer", "register"]


class DifferentiableLearnedOptimizer(higher.optim.DifferentiableOptimizer):
    """The differentiable (``higher``) counterpart of :class:`LearnedOptimizer`.

    Args:
        other: the drop-in optimizer whose param groups, state and rule are copied.
        reference_params: the model's parameters, as for every ``higher`` optimizer.
        rule: a rule to use instead of ``other``'s frozen copy, e.g. one whose weights require
            gradients, so that the meta-gradient reaches theta.
        **kwargs: passed to ``higher.optim.DifferentiableOptimizer``.
    """

    def __init__(
        self,
        other: LearnedOptimizer,
        reference_params: Any,
        *,
        rule: UpdateRule | None = None,
        **kwargs: Any,
    ) -> None:
        self._other = other
        self._rule = rule
        super().__init__(other, reference_params, **kwargs)

    def _rule_for(self, p: torch.Tensor) -> UpdateRule:
        if self._rule is not None:
            return self._rule
        return self._other._rule_for(p)

    def _update(self, grouped_grads: list[list[torch.Tensor | None]], **kwargs: Any) -> None:
        for group_idx, (group, grads) in enumerate(zip(self.param_groups, grouped_grads)):
            for p_idx, (p, g) in enumerate(zip(group["params"], grads)):
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(
                        "DifferentiableLearnedOptimizer does not support sparse gradients"
                    )
                rule = self._rule_for(p)
                state = self.state[group_idx][p_idx]
                g = g.to(_compute_dtype(p.dtype))  # float16's step in float32, as the drop-in's
                if len(state) == 0:  # as the drop-in optimizer's (its horizon, the shape)
                    state.update(self._other._fresh_state(rule, p, group, like=g))
                if group.get("maximize", False):
                    g = -g
                # A drop-in optimizer's state may be stored in another dtype (state_dtype):
                # compute in the gradient's.
                work = {
                    k: v.to(g.dtype)
                    if isinstance(v, torch.Tensor)
                    and v.is_floating_point()
                    and v.dtype != g.dtype
                    and rule.coord_dim(k) is not None
                    else v
                    for k, v in state.items()
                }
                update, new_state = rule(g.reshape(-1), work)
                state.update(new_state)
                self._other._cast_state(rule, state)  # stored as the drop-in's (state_dtype)
                lr, decay = group["lr"], group.get("weight_decay", 0.0)
                new = p.to(update.dtype)
                if decay != 0:  # decoupled, as the drop-in optimizer's
                    new = new * (1 - lr * decay)
                group["params"][p_idx] = (new + lr * update.view(p.shape)).to(p.dtype)


def register() -> None:
    """Register the learned optimizers with ``higher`` (done on import of :mod:`learned_opt`)."""
    for cls in (LearnedOptimizer, LSTMOptimizer):
        higher.register_optim(cls, DifferentiableLearnedOptimizer)
