"""The drop-in optimizer's in-place step of :class:`~learned_opt.rules.LSTMCorrectedAdamRule`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .base import RuleState

if TYPE_CHECKING:
    from .corrected_adam import LSTMCorrectedAdamRule

__all__ = ["step_"]


def _write_back(rule: LSTMCorrectedAdamRule, state: RuleState, new_state: RuleState) -> None:
    """Store ``new_state`` into ``state``: per-coordinate entries into the stored tensors (in
    their storage dtype), the rest by replacement."""
    for key, value in new_state.items():
        old = state.get(key)
        if (
            old is not None
            and rule.coord_dim(key) is not None
            and old.shape == value.shape
            and old is not value
        ):
            old.copy_(value)
        else:
            state[key] = value


@torch.no_grad()
def step_(rule: LSTMCorrectedAdamRule, grad: Tensor, state: RuleState) -> Tensor:
    """``rule.forward``'s step on one whole tensor's flat gradient, with ``state`` updated in
    place; per-coordinate entries stored in another dtype are computed in ``grad``'s."""
    work = {
        k: v.to(grad.dtype) if v.is_floating_point() and rule.coord_dim(k) is not None else v
        for k, v in state.items()
    }
    update, new_state = rule(grad, work)
    _write_back(rule, state, new_state)
    return update
