"""``LSTMOptimizer``: the drop-in optimizer with the shipped, meta-trained LSTM weights."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from . import pretrained
from .checkpoint import WeightsMismatchError, load_rule
from .optim import LearnedOptimizer, refuse_a_tensor
from .rules import LSTMCorrectedAdamRule, LSTMRule, UpdateRule

__all__ = ["LSTMOptimizer"]

#: The rules LSTMOptimizer runs: the paper's LSTM and the LSTM-corrected Adam rule, alone or
#: under a learned schedule (:class:`~learned_opt.rules.scheduled.ScheduledRule`).
_LSTM_RULES = (LSTMRule, LSTMCorrectedAdamRule)


def _lstm(rule: UpdateRule) -> UpdateRule | None:
    """The coordinatewise LSTM rule inside ``rule`` (itself, or a schedule's base), or None."""
    return rule.unwrapped if isinstance(rule.unwrapped, _LSTM_RULES) else None


def _resolve_weights(
    weights: str | os.PathLike | UpdateRule | None,
) -> tuple[UpdateRule | None, dict[str, Any]]:
    if weights is None:
        weights = pretrained.DEFAULT
    if isinstance(weights, UpdateRule):
        return weights, {}
    rule, meta = load_rule(pretrained.resolve(weights))
    if _lstm(rule) is None:
        raise WeightsMismatchError(
            f"weights={weights!r} hold a {rule.kind!r} rule, not a coordinatewise LSTM "
            f"({', '.join(repr(c.kind) for c in _LSTM_RULES)}); use LearnedOptimizer(params, rule)"
        )
    return rule, meta


class LSTMOptimizer(LearnedOptimizer):
    r"""A coordinatewise learned optimizer with shipped, meta-trained LSTM weights, drop-in.

    Usage::

        opt = learned_opt.LSTMOptimizer(model.parameters())
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()

    By default (``weights=None``) the optimizer runs the shipped ``"general-v7"`` weights: the
    rule of :class:`~learned_opt.rules.LSTMCorrectedAdamRule` with Muon's orthogonalized
    momentum as the direction of every parameter of 2 or more dimensions (``orthogonal``, at the
    root mean square of its Adam direction), a per-tensor step size moved by a meta-learned
    controller (``lr_adapt_learned``) and, when told the run's length (``total_steps``), a
    linear warm-up over its first 2% and a linear decay over its last 20%
    (:class:`~learned_opt.rules.ScheduledRule`; without ``total_steps``, no schedule). The
    rule: Adam's step (momenta 0.8 and 0.95; Muon's direction for matrices),
    scaled per coordinate by a small LSTM (16 units, shared by all coordinates, reading
    scale-invariant features of each coordinate's gradient history; its correction is bounded to
    a factor in [1/e, e]), times a per-tensor step size whose log changes at each step by the
    output of a small MLP (71 weights) of the tensor's scale-free statistics (the cosine between
    its gradient and its last update, the gradient norm against its peak, the step count), with
    per-tensor clipping of unusually large gradients. Its configuration is
    :class:`~learned_opt.rules.LSTMCorrectedAdamConfig`. Each parameter keeps Adam's moments, a
    second fast moment, four more momenta, its last direction and the LSTM's hidden and cell
    states (160 bytes per float32 parameter; 82 with ``state_dtype=torch.bfloat16``), plus four
    numbers per tensor. ``weights="general-v7-lean"`` is the same rule without the LSTM (the
    same controller; 12 bytes per parameter: Adam's moments and the last direction), within
    0.7% of the default on the sealed test tasks. The paper's coordinatewise
    LSTM (Andrychowicz et al., 2016; :class:`~learned_opt.rules.LSTMRule`: log/sign inputs, the
    LSTM writes the whole update) is available as ``weights="paper-mnist"``.

    Args:
        params: parameters or param-group dicts.
        weights: ``None`` for the shipped default (``learned_opt.pretrained.DEFAULT``), the name of
            shipped weights (``learned_opt.pretrained.available()``), the path of a weights file or
            meta-trainer checkpoint, or a rule: an :class:`~learned_opt.rules.LSTMRule`, an
            :class:`~learned_opt.rules.LSTMCorrectedAdamRule` or a
            :class:`~learned_opt.rules.ScheduledRule` around either.
        lr: multiplier on the learned update (1.0 = as meta-trained); schedulable.
        nonfinite: ``"skip"`` (default) or ``"raise"``; see :class:`LearnedOptimizer`.
        weight_decay: decoupled weight decay, see :class:`LearnedOptimizer`.
        maximize: maximize the objective instead of minimizing it.
        orthogonal: ``False`` (for all parameters, or per param group) moves matrices along
            Adam's direction instead of Muon's, as the usual Muon recipe does for embeddings and
            the output layer (see :class:`LearnedOptimizer`).
        total_steps: the run's length, for weights of a horizon-aware rule (see
            :class:`LearnedOptimizer`); a ``ValueError`` for weights that cannot read it.
        hidden_size, num_layers: if given, the architecture the weights must have.
        state_dtype: ``torch.bfloat16`` stores the per-coordinate state in bfloat16 (half the
            bytes); it is upcast for the step and rounded back. ``None``: the dtype the step is
            computed in (the parameter's; float32 for float16 and bfloat16).

    Raises:
        ValueError: empty parameters, bad ``lr``, unknown weights name or missing file.
        learned_opt.checkpoint.WeightsMismatchError: weights of another architecture.
        learned_opt.checkpoint.CheckpointError: a corrupt or unsafe weights file.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        weights: str | os.PathLike | UpdateRule | None = None,
        lr: float = 1.0,
        nonfinite: str = "skip",
        hidden_size: int | None = None,
        num_layers: int | None = None,
        state_dtype: torch.dtype | None = None,
        weight_decay: float = 0.0,
        maximize: bool = False,
        orthogonal: bool = True,
        total_steps: int | None = None,
    ) -> None:
        refuse_a_tensor(params)
        params = list(params)
        if len(params) == 0:
            raise ValueError("optimizer got an empty parameter list")
        rule, meta = _resolve_weights(weights)
        lstm = _lstm(rule)
        if lstm is None:
            raise TypeError(
                "LSTMOptimizer needs an LSTMRule or LSTMCorrectedAdamRule (or a ScheduledRule "
                f"around one), got {type(rule).__name__}"
            )
        for name, want in (("hidden_size", hidden_size), ("num_layers", num_layers)):
            have = getattr(lstm, name)
            if want is not None and want != have:
                raise WeightsMismatchError(
                    f"weights={weights!r}: expected an LSTM with {name}={want}, found {name}={have}"
                )
        self.metadata = meta
        super().__init__(
            params,
            rule,
            lr=lr,
            nonfinite=nonfinite,
            state_dtype=state_dtype,
            weight_decay=weight_decay,
            maximize=maximize,
            orthogonal=orthogonal,
            total_steps=total_steps,
        )
