"""The update-rule interface shared by learned and hand-designed rules."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "RULES",
    "RuleState",
    "UpdateRule",
    "bounded_grad",
    "checked_output",
    "grad_bound",
    "rounded",
    "store_",
]

RuleState = dict[str, Tensor]

#: Rule classes by their ``kind`` (the name saved in weights files and checkpoints): every
#: subclass of :class:`UpdateRule` that sets a ``kind`` of its own is entered as it is defined.
RULES: dict[str, type[UpdateRule]] = {}


class UpdateRule(nn.Module):
    """A coordinatewise update rule: a pure function ``(grad, state) -> (update, state)``.

    The rule's meta-parameters theta are the module's parameters. The update is *added* to the
    optimizee's parameters: ``phi <- phi + lr * update``. Rules never write in place, so the same
    code serves the drop-in optimizer (under ``no_grad``) and the differentiable unroll.

    A rule sees one flat, 1-D tensor of coordinates at a time. Because every rule here is
    coordinatewise, applying it to the concatenation of all parameters or to each parameter
    separately gives the same result; the unroll uses the former, the drop-in optimizer the
    latter. Per-coordinate state tensors put the coordinate axis at ``coord_dim(key)``.

    A rule whose :attr:`tensor_aware` is true also reads statistics of each whole parameter
    tensor (e.g. the per-tensor step-size adaptation of
    :class:`~learned_opt.rules.LSTMCorrectedAdamRule`):
    its :meth:`init_state` takes ``numels``, the sizes of the tensors the flat vector
    concatenates (the unroll passes them; the drop-in optimizer calls it once per tensor, whole,
    never in chunks).

    Subclasses implement :meth:`init_state`, :meth:`forward` and :meth:`config`, and set
    :attr:`kind`, a name of their own: the class is entered in :data:`RULES` under it as it is
    defined, so that :func:`~learned_opt.rules.build_rule`, ``load_rule`` and a resumed
    optimizer or meta-trainer rebuild it (define the class before loading its weights). A
    subclass that keeps its parent's kind would load back as the parent: its weights are
    refused when saved.
    """

    #: Name under which :func:`learned_opt.rules.build_rule` finds the class (:data:`RULES`).
    kind: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if not kind:
            return
        taken = RULES.get(kind)
        same = taken is not None and (taken.__module__, taken.__qualname__) == (
            cls.__module__,
            cls.__qualname__,
        )  # the same class defined again (a module reloaded, a notebook cell run again)
        if taken is not None and not same:
            raise TypeError(
                f"Rule kind {kind!r} is taken by {taken.__module__}.{taken.__qualname__}: give "
                f"{cls.__qualname__} a kind of its own"
            )
        RULES[kind] = cls

    @property
    def tensor_aware(self) -> bool:
        """Whether the update of a coordinate depends on the rest of its parameter tensor."""
        return False

    @property
    def unwrapped(self) -> UpdateRule:
        """The rule that computes the update's direction: ``self``, or for a rule that wraps
        another (:class:`~learned_opt.rules.ScheduledRule`) the rule inside it."""
        return self

    @property
    def reads_shape(self) -> bool:
        """Whether :meth:`init_state` reads the parameters' shapes (e.g. a rule that moves
        matrices differently from vectors): the drop-in optimizer passes ``shape``, the
        parameter tensor's; a meta-learner's unroll over a flat vector of several tensors
        passes ``shapes``, theirs in order (and ``numels`` with :attr:`tensor_aware`)."""
        return False

    def init_state(self, numel: int, *, like: Tensor) -> RuleState:
        """Fresh state for ``numel`` coordinates on ``like``'s device and dtype."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement init_state()")

    def forward(self, grad: Tensor, state: RuleState) -> tuple[Tensor, RuleState]:
        """Return ``(update, new_state)`` for a flat gradient ``grad`` of shape ``(n,)``."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement forward()")

    def config(self) -> dict[str, Any]:
        """JSON-serializable constructor arguments (saved in every checkpoint)."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement config()")

    def coord_dim(self, key: str) -> int | None:
        """Axis of state entry ``key`` that indexes coordinates (``None``: shared scalar)."""
        return 0

    def precise_keys(self) -> frozenset[str]:
        """Per-coordinate state entries kept in float32 when the optimizer stores the others in
        bfloat16 (``state_dtype``): moving averages whose weight of the new value, ``1 - beta``,
        is below bfloat16's resolution (8 bits): rounded to bfloat16 after each update they
        would stop following a gradient that shrinks."""
        return frozenset()

    def nonfinite_weights(self) -> list[str]:
        """Names of the weights holding NaN or Inf (an in-place step relies on finite weights
        for finite updates)."""
        return [
            k
            for k, v in self.state_dict().items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())
        ]

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())


def checked_output(rule: UpdateRule, output: Any, n: int) -> tuple[Tensor, dict[str, Any]]:
    """A rule's ``(update, new_state)`` for ``n`` coordinates, or a ``TypeError`` /
    ``ValueError`` saying what it returned instead (before anything is stepped)."""
    if not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], dict)):
        raise TypeError(
            f"the {rule.kind or type(rule).__qualname__!r} rule returned "
            f"{type(output).__name__}, not (update, new_state)"
        )
    update = output[0]
    if not (isinstance(update, Tensor) and update.shape == (n,) and update.is_floating_point()):
        what = (
            f"a {update.dtype} tensor of shape {tuple(update.shape)}"
            if isinstance(update, Tensor)
            else type(update).__name__
        )
        raise ValueError(
            f"the {rule.kind or type(rule).__qualname__!r} rule returned an update of {what} "
            f"for a gradient of shape ({n},): an update has the gradient's shape"
        )
    return output


def slow_average(beta: float) -> bool:
    """Whether a moving average of weight ``1 - beta`` needs float32 storage (see
    :meth:`UpdateRule.precise_keys`)."""
    return 1 - beta < 2.0**-8


def step_count(state: RuleState, like: Tensor) -> Tensor:
    """The incremented step counter, as a 0-dim float tensor like torch.optim keeps it."""
    step = state.get("step")
    if step is None:
        return torch.ones((), dtype=torch.float32, device=like.device)
    return step + 1


def grad_bound(dtype: torch.dtype) -> float:
    """The largest gradient magnitude a rule reads in ``dtype``: a power of two ``G`` with
    ``G**2`` times 2**40 below the dtype's largest number (2**44, about 1.8e13, in float32 and
    bfloat16; 2**492 in float64; float16 is computed in float32 by the optimizer).

    Squares of gradients (second moments) and their sums over tensors of up to 2**36 coordinates
    then stay finite, so a finite gradient can never produce an infinite or NaN feature. Real
    gradients are many orders of magnitude smaller, so the bound changes nothing in practice.
    """
    max_exp = math.frexp(torch.finfo(dtype).max)[1]  # 128 for float32 and bfloat16
    return math.ldexp(1.0, (max_exp - 40) // 2)


def rounded(value: Tensor, dtype: torch.dtype) -> Tensor:
    """``value`` in ``dtype``, for storage, clamped to ``dtype``'s finite range where it is
    narrower than ``value``'s: a float64 second moment beyond float32's range is stored as the
    largest float32, not as Inf (which would make every later update of the tensor
    non-finite). Values within the range round as ``value.to(dtype)`` does."""
    if value.is_floating_point() and dtype.is_floating_point:
        big = torch.finfo(dtype).max
        if big < torch.finfo(value.dtype).max:
            value = value.clamp(-big, big)
    return value.to(dtype)


def store_(stored: Tensor, value: Tensor) -> None:
    """``stored.copy_(value)``, clamped to ``stored``'s range as :func:`rounded` does."""
    stored.copy_(rounded(value, stored.dtype) if stored.dtype != value.dtype else value)


def bounded_grad(grad: Tensor) -> Tensor:
    """``grad`` with each coordinate clamped to ``[-G, G]``, ``G = grad_bound(grad.dtype)``
    (the same tensor values, bit for bit, wherever ``|grad| <= G``)."""
    bound = grad_bound(grad.dtype)
    return grad.clamp(-bound, bound)


def safe_sqrt(x: Tensor) -> Tensor:
    """``x.sqrt()`` whose gradient is 0 (not ``nan``) where ``x == 0``.

    Second-moment estimates are 0 where a coordinate has had only zero gradients (a dead unit, a
    padded input). Backpropagating through them to the gradient (second-order meta-gradients)
    multiplies sqrt's infinite derivative at 0 by the zero derivative of ``g * g``, which is
    ``nan``; here that derivative is 0, the value of the limit. Same values as ``sqrt``.
    """
    if not x.requires_grad:
        return x.sqrt()
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), 0.0)
