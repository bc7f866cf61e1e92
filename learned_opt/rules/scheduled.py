"""A learned step-size schedule around any update rule: the rule reads how far training has gone.

Hand-designed training recipes warm the learning rate up and decay it towards the end of a run
whose length is known; VeLO (Metz et al., 2022) gives its learned optimizer the fraction of
training done as an input for the same reason. :class:`ScheduledRule` multiplies the update of a
base rule by ``exp(s_t)``, where ``s_t`` is a small MLP of features of the step ``t`` and, when
the run's length ``T`` is known, of the progress ``t / T``. With the MLP's last layer at zero (the
initialization) the rule *is* its base rule, so meta-training starts from it.

The run's length lives in the rule state as ``total_steps`` (0: unknown). The drop-in optimizer
sets it from ``LSTMOptimizer(params, total_steps=N)``; without it, the progress features are
zero and a separate flag input is 0, so the schedule depends on ``t`` alone: a horizon-free rule
(it can still learn a warm-up); with ``unknown_horizon="base"`` the rule is then its base rule,
step for step (for a schedule meta-trained only with the horizon told). The schedule is one
number per step, shared by all coordinates, so it costs nothing per parameter and composes with
``torch.optim.lr_scheduler`` (which scales the optimizer's ``lr`` multiplier on top of it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import RuleState, UpdateRule

__all__ = ["ScheduledRule", "schedule_basis", "schedule_features"]

#: Inputs of the schedule MLP.
NUM_FEATURES = 7
#: Log-schedules of the optional linear path (``ScheduledRule(basis=True)``).
NUM_BASIS = 3
#: What a rule does without the run's length (``ScheduledRule(unknown_horizon=...)``).
UNKNOWN_HORIZON = ("learned", "base")


def schedule_basis(step: Tensor, total_steps: Tensor, tails: Sequence[float] = ()) -> Tensor:
    """Log-schedules of step ``t`` (>= 1) of a run of ``T`` steps (``T = 0``: unknown), shape
    ``(3 + len(tails),)``, which a weight ``w`` turns into a schedule factor ``exp(w * b)``:

    - ``log((T - t + 1) / T)`` when ``T`` is known (else 0): ``w = 1`` decays the step linearly
      to ``1 / T`` at the last step; ``w = 1/2``, as a square root;
    - ``log(1 - exp(-t / 10))``: a warm-up over the first tens of steps, told ``T`` or not;
    - ``-log(1 + t / 100)`` when ``T`` is unknown (else 0): a horizon-free decay,
      ``(1 + t / 100)^-w`` (``w = 1/2``: inverse square root);
    - per ``c`` of ``tails``, ``log(min(1, (T - t + 1) / (c T)))`` when ``T`` is known (else
      0): a late decay, over the last ``c T`` steps only (``w = 1``: linear, to ``1 / (c T)``).
    """
    t = step.to(torch.float32).clamp_min(1.0)
    total = total_steps.to(torch.float32)
    known = total > 0
    remaining = ((total - t + 1.0) / total.clamp_min(1.0)).clamp(min=1.0 / total.clamp_min(1.0))
    zero = torch.zeros_like(t)
    late = []
    for c in tails:
        span = (c * total).clamp_min(1.0)
        down = ((total - t + 1.0) / span).clamp(min=1.0 / span, max=1.0)
        late.append(torch.where(known, torch.log(down), zero))
    return torch.stack(
        (
            torch.where(known, torch.log(remaining.clamp(max=1.0)), zero),
            torch.log(-torch.expm1(-t / 10.0)),
            torch.where(known, zero, -torch.log1p(t / 100.0)),
            *late,
        )
    )


def schedule_features(step: Tensor, total_steps: Tensor) -> Tensor:
    """Features of step ``t`` (>= 1) of a run of ``T`` steps (``T = 0``: unknown), shape (7,):
    ``[known, p, p^2, cos(pi p), exp(-t/10), exp(-t/100), log(t)/log(10^4)]`` with
    ``p = min(t / T, 1)`` (the first four are 0 when ``T`` is unknown)."""
    t = step.to(torch.float32)
    total = total_steps.to(torch.float32)
    known = (total > 0).to(torch.float32)
    p = torch.where(total > 0, (t / total.clamp_min(1.0)).clamp(max=1.0), torch.zeros_like(t))
    return torch.stack(
        (
            known,
            p,
            p * p,
            known * torch.cos(math.pi * p),
            torch.exp(-t / 10.0),
            torch.exp(-t / 100.0),
            torch.log(t.clamp_min(1.0)) / math.log(1e4),
        )
    )


class ScheduledRule(UpdateRule):
    r"""``update = exp(s_t) * base(grad)``, ``s_t = A tanh((MLP(features(t, T)) + w . b(t, T))
    / A)`` (the linear path ``w . b`` only with ``basis=True``).

    Args:
        base: the kind of the base rule (``learned_opt.rules.RULES``), e.g. ``"general-lstm"``.
        base_config: the base rule's configuration (its :meth:`~UpdateRule.config`).
        hidden: units of the schedule MLP's hidden layer.
        bound: ``A``: the schedule multiplies the update by at most ``e^A`` and at least
            ``e^-A``.
        unknown_horizon: what the rule does when the run's length is not given: ``"learned"``
            (the schedule of ``t`` alone) or ``"base"`` (no schedule: the base rule's update).
        warmup, tail: a hand-designed part of the schedule, applied when the run's length
            ``T`` is known: a linear warm-up over the first ``warmup * T`` steps (from
            ``1 / ceil(warmup * T)``) and a linear decay over the last ``tail * T`` (to
            ``1 / (tail * T)`` at step ``T``, kept after it); 0: none. The learned part
            multiplies it.
        learn_schedule: meta-learn the schedule (``False``: it is fixed, so a
            meta-trainer learns only the base rule's learnable weights).
        basis: add a linear path ``w . b(t, T)`` on three log-schedules
            (:func:`schedule_basis`: a decay to the end of a known run, a warm-up, a decay
            without a known end), ``w`` at zero at the start: a learned schedule of this family
            needs ``w`` of order 1, which an MLP on fixed random features reaches only with
            large output weights.
        basis_tails: with ``basis``, one more log-schedule per fraction ``c`` in ``(0, 1]``: a
            decay over the last ``c T`` steps of a known run only.

    The state holds the base rule's state, ``total_steps`` (a 0-dim tensor, 0 when unknown) and
    the base rule's step counter.
    """

    kind = "scheduled"

    def __init__(
        self,
        base: str = "general-lstm",
        base_config: dict[str, Any] | None = None,
        hidden: int = 16,
        bound: float = 3.0,
        unknown_horizon: str = "learned",
        warmup: float = 0.0,
        tail: float = 0.0,
        learn_schedule: bool = True,
        basis: bool = False,
        basis_tails: Sequence[float] = (),
    ) -> None:
        super().__init__()
        from . import build_rule  # the registry imports this module

        if base == self.kind:
            raise ValueError("A ScheduledRule cannot wrap another ScheduledRule")
        if hidden < 1 or bound <= 0:
            raise ValueError(f"Invalid schedule: hidden={hidden}, bound={bound}")
        if unknown_horizon not in UNKNOWN_HORIZON:
            raise ValueError(
                f"Invalid unknown_horizon: {unknown_horizon!r} (choose from {UNKNOWN_HORIZON})"
            )
        self.unknown_horizon = unknown_horizon
        if not (0.0 <= warmup < 1.0 and 0.0 <= tail <= 1.0):
            raise ValueError(f"Invalid hand-designed schedule: warmup={warmup}, tail={tail}")
        self.warmup, self.tail = float(warmup), float(tail)
        self.base_kind = base
        self.base = build_rule(base, base_config)
        if "step" not in self.base.init_state(1, like=torch.zeros(1)):
            raise ValueError(f"A ScheduledRule needs a base rule that counts steps, not {base!r}")
        self.hidden = int(hidden)
        self.bound = float(bound)
        self.schedule = nn.Sequential(
            nn.Linear(NUM_FEATURES, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 1)
        )
        self.basis_tails = tuple(float(c) for c in basis_tails)
        if self.basis_tails and not basis:
            raise ValueError("basis_tails adds log-schedules to the linear path: it needs basis")
        if not all(0.0 < c <= 1.0 for c in self.basis_tails):
            raise ValueError(f"Invalid basis_tails: {self.basis_tails} (each in (0, 1])")
        width = NUM_BASIS + len(self.basis_tails)
        self.basis = nn.Linear(width, 1, bias=False) if basis else None
        self.learn_schedule = bool(learn_schedule)
        self.schedule.requires_grad_(self.learn_schedule)
        if self.basis is not None:
            self.basis.requires_grad_(self.learn_schedule)
        self.reset_schedule()

    def reset_schedule(self, generator: torch.Generator | None = None) -> None:
        """Hidden layer ~ U(-1/sqrt(7), 1/sqrt(7)); output layer (and the linear path) zero:
        the identity schedule."""
        bound = 1.0 / math.sqrt(NUM_FEATURES)
        with torch.no_grad():
            first, last = self.schedule[0], self.schedule[2]
            first.weight.uniform_(-bound, bound, generator=generator)
            first.bias.uniform_(-bound, bound, generator=generator)
            last.weight.zero_()
            last.bias.zero_()
            if self.basis is not None:
                self.basis.weight.zero_()

    @property
    def tensor_aware(self) -> bool:
        return self.base.tensor_aware

    @property
    def unwrapped(self) -> UpdateRule:
        """The base rule (the schedule only scales its update)."""
        return self.base.unwrapped

    @property
    def reads_horizon(self) -> bool:
        return True

    @property
    def reads_shape(self) -> bool:
        return self.base.reads_shape

    def init_state(
        self,
        numel: int,
        *,
        like: Tensor,
        numels: Sequence[int] | None = None,
        total_steps: int | None = None,
        shape: Sequence[int] | None = None,
        shapes: Sequence[Sequence[int]] | None = None,
    ) -> RuleState:
        """The base rule's fresh state plus ``total_steps`` (``None``: unknown, stored as 0)."""
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"Invalid total_steps: {total_steps} (must be >= 1)")
        kwargs: dict[str, Any] = {}
        if numels is not None and self.base.tensor_aware:
            kwargs["numels"] = numels
        if shape is not None and self.base.reads_shape:
            kwargs["shape"] = shape
        if shapes is not None and self.base.reads_shape:
            kwargs["shapes"] = shapes
        state = self.base.init_state(numel, like=like, **kwargs)  # type: ignore[call-arg]
        state["total_steps"] = torch.tensor(float(total_steps or 0), device=like.device)
        return state

    def coord_dim(self, key: str) -> int | None:
        return None if key == "total_steps" else self.base.coord_dim(key)

    def precise_keys(self) -> frozenset[str]:
        return self.base.precise_keys()

    def log_scale(self, step: Tensor, total_steps: Tensor) -> Tensor:
        """``s_t`` for step ``step`` (1-based) of ``total_steps`` (0: unknown)."""
        feats = schedule_features(step, total_steps).to(self.schedule[0].weight)
        raw = self.schedule(feats).squeeze(-1)
        if self.basis is not None:
            basis = schedule_basis(step, total_steps, self.basis_tails).to(self.basis.weight)
            raw = raw + self.basis(basis).squeeze(-1)
        s = self.bound * torch.tanh(raw / self.bound)
        if self.unknown_horizon == "base":
            s = torch.where(total_steps > 0, s, torch.zeros_like(s))
        if self.warmup or self.tail:
            s = s + self.hand_log_scale(step, total_steps).to(s)
        return s

    def hand_log_scale(self, step: Tensor, total_steps: Tensor) -> Tensor:
        """The log of the hand-designed warm-up and decay at ``step`` of ``total_steps`` (0
        when it is unknown, or with ``warmup = tail = 0``)."""
        t = step.to(torch.float32)
        total = total_steps.to(torch.float32)
        known = total > 0
        log_f = torch.zeros_like(t)
        if self.warmup > 0:
            w = torch.ceil(self.warmup * total).clamp_min(1.0)
            log_f = log_f + torch.log((t / w).clamp(max=1.0))
        if self.tail > 0:
            span = (self.tail * total).clamp_min(1.0)
            down = ((total - t + 1.0) / span).clamp(min=1.0 / span, max=1.0)
            log_f = log_f + torch.log(down)
        return torch.where(known, log_f, torch.zeros_like(log_f))

    def forward(self, grad: Tensor, state: RuleState) -> tuple[Tensor, RuleState]:
        total = state.get("total_steps")
        if total is None:
            total = torch.zeros((), device=grad.device)
        base_state = {k: v for k, v in state.items() if k != "total_steps"}
        update, new_state = self.base(grad, base_state)
        step = new_state["step"]
        scale = torch.exp(self.log_scale(step, total)).to(update.dtype)
        new_state["total_steps"] = total
        return update * scale, new_state

    def step_(self, grad: Tensor, state: RuleState) -> Tensor:
        """The drop-in optimizer's in-place step: the base rule's (its fused kernel where it has
        one) times the schedule's factor; ``state`` is updated in place. The update is bounded
        when the base rule's is (the factor is at most ``e^A``)."""
        total = state.get("total_steps")
        if total is None:
            total = torch.zeros((), device=grad.device)
        base_state = {k: v for k, v in state.items() if k != "total_steps"}
        base_step = getattr(self.base, "step_", None)
        if base_step is not None:
            update = base_step(grad, base_state)
        else:
            update, base_state = self.base(grad, base_state)
        state.update(base_state)
        scale = torch.exp(self.log_scale(state["step"], total)).to(update.dtype)
        return update * scale

    def chunked_step_(self, grad: Tensor, state: RuleState, *, write: bool = True) -> Tensor | None:
        """The base rule's ``chunked_step_`` (``None`` without one, or where it returns
        ``None``) times the schedule's factor; ``write=False``: the update alone, ``state`` left
        as it was."""
        base_step = getattr(self.base, "chunked_step_", None)
        if base_step is None:
            return None
        total = state.get("total_steps")
        if total is None:
            total = torch.zeros((), device=grad.device)
        base_state = {k: v for k, v in state.items() if k != "total_steps"}
        step = state["step"] + 1
        update = base_step(grad, base_state, write=write)
        if update is None:
            return None
        if write:
            state.update(base_state)
        scale = torch.exp(self.log_scale(step, total)).to(update.dtype)
        return update * scale

    def config(self) -> dict[str, Any]:
        return {
            "base": self.base_kind,
            "base_config": self.base.config(),
            "hidden": self.hidden,
            "bound": self.bound,
            "unknown_horizon": self.unknown_horizon,
            "warmup": self.warmup,
            "tail": self.tail,
            "learn_schedule": self.learn_schedule,
            "basis": self.basis is not None,
            "basis_tails": list(self.basis_tails),
        }
