"""Use learned rules inside ``higher.innerloop_ctx`` (Grefenstette et al., 2019).

Importing :mod:`learned_opt` registers :class:`DifferentiableLearnedOptimizer` with ``higher`` for
:class:`~learned_opt.optim.LearnedOptimizer` and :class:`~learned_opt.LSTMOptimizer`, so
existing higher-based code works unchanged::

    opt = learned_opt.LSTMOptimizer(model.parameters())
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        for x, y in batches:
            diffopt.step(loss_fn(fmodel(x), y))

The differentiable step applies the same rule, with the same per-parameter state layout, as the
drop-in optimizer, so both follow the same trajectory, and keeps its ``nonfinite`` policy: a
tensor whose gradient or update is not finite keeps its values and state (``"skip"``, with a
warning), or the step raises :class:`~learned_opt.optim.NonFiniteGradientError` before any
parameter or state changes (``"raise"``). By default the optimizer's (frozen) rule is
used; construct
``DifferentiableLearnedOptimizer(opt, params, rule=trainable_rule)`` to backpropagate into theta.
"""

from __future__ import annotations

from typing import Any

import higher
import torch

from .lstm_optimizer import LSTMOptimizer
from .optim import (
    LearnedOptimizer,
    _compute_dtype,
    _finite_flags,
    _nonfinite_gradient,
    _nonfinite_update,
    _warn_skipped,
    autocast_off,
)
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
        with autocast_off():  # as the drop-in optimizer's step
            self._update_all(grouped_grads)

    def _update_all(self, grouped_grads: list[list[torch.Tensor | None]]) -> None:
        work = []
        for group_idx, grads in enumerate(grouped_grads):
            for p_idx, g in enumerate(grads):
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(
                        "DifferentiableLearnedOptimizer does not support sparse gradients"
                    )
                work.append((group_idx, p_idx, g))
        # As the drop-in optimizer's step: every gradient checked first, and with "raise"
        # nothing committed until every update is known to be finite.
        policy = self._other.nonfinite
        finite = _finite_flags([g.detach() for *_, g in work])
        if policy == "raise" and not all(finite):
            group_idx, p_idx, _ = work[finite.index(False)]
            raise _nonfinite_gradient(self.param_groups[group_idx]["params"][p_idx])
        skipped = finite.count(False)
        steps = [
            (group_idx, p_idx, *self._step(group_idx, p_idx, g))
            for (group_idx, p_idx, g), ok in zip(work, finite)
            if ok
        ]
        finite = _finite_flags([checked.detach() for *_, checked in steps])
        if policy == "raise" and not all(finite):
            group_idx, p_idx, *_ = steps[finite.index(False)]
            raise _nonfinite_update(self.param_groups[group_idx]["params"][p_idx])
        skipped += finite.count(False)
        for (group_idx, p_idx, rule, new_state, new, _), ok in zip(steps, finite):
            if ok:
                state = self.state[group_idx][p_idx]
                state.update(new_state)
                self._other._cast_state(rule, state)  # stored as the drop-in's (state_dtype)
                self.param_groups[group_idx]["params"][p_idx] = new
        if skipped:
            _warn_skipped(self, skipped, stacklevel=4)  # (the caller's diffopt.step)

    def _step(
        self, group_idx: int, p_idx: int, g: torch.Tensor
    ) -> tuple[UpdateRule, dict[str, Any], torch.Tensor, torch.Tensor]:
        """The rule, new state and new value of one parameter (nothing committed), and what to
        check: the update, or a float16 parameter's new value (which can leave its range)."""
        group = self.param_groups[group_idx]
        p = group["params"][p_idx]
        rule = self._rule_for(p)
        state = self.state[group_idx][p_idx]
        g = g.to(_compute_dtype(p.dtype))  # float16's step in float32, as the drop-in's
        if len(state) == 0:  # as the drop-in optimizer's (its horizon, the shape)
            state.update(self._other._fresh_state(rule, p, group, like=g))
        if group.get("maximize", False):
            g = -g
        # A drop-in optimizer's state may be stored in another dtype (state_dtype): compute in
        # the gradient's.
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
        lr, decay = group["lr"], group.get("weight_decay", 0.0)
        new = p.to(update.dtype)
        if decay != 0:  # decoupled, as the drop-in optimizer's
            new = new * (1 - lr * decay)
        new = (new + lr * update.view(p.shape)).to(p.dtype)
        return rule, new_state, new, new if p.dtype == torch.float16 else update


def register() -> None:
    """Register the learned optimizers with ``higher`` (done on import of :mod:`learned_opt`)."""
    for cls in (LearnedOptimizer, LSTMOptimizer):
        higher.register_optim(cls, DifferentiableLearnedOptimizer)
