"""The drop-in ``torch.optim.Optimizer`` around any update rule."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from .checkpoint import rule_from_dict, rule_to_dict
from .rules import UpdateRule
from .rules.base import checked_output, rounded, store_

__all__ = ["LearnedOptimizer", "NonFiniteGradientError", "STATE_DTYPES"]

_NONFINITE_POLICIES = ("skip", "raise")
#: Storage dtypes of the per-coordinate optimizer state (``None``: the dtype the step is computed
#: in, the parameter's or float32 for float16 and bfloat16).
STATE_DTYPES = (None, torch.float32, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter's step is computed in: its own, except for the half types, computed
    in float32: float16's range (up to 65504) the squared gradients of a second moment
    overflow, and in bfloat16's 8-bit mantissa a moving average whose weight ``1 - beta`` is
    below half a unit in the last place stops moving."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _scalar(lr: float | Tensor) -> float | Tensor:
    """A group's ``lr`` as an ``alpha``: a one-element tensor as a 0-dim one, as torch.optim's
    take it."""
    return lr.reshape(()) if isinstance(lr, Tensor) else lr


def _all_finite(x: Tensor) -> bool:
    """Whether every element of ``x`` is finite. A NaN or Inf makes the sum non-finite, so a
    finite sum (one fast reduction) settles it; only a non-finite sum (which finite elements
    can also give, by overflow) needs the elementwise check."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _finite_flags(tensors: list[Tensor]) -> list[bool]:
    """:func:`_all_finite` of each tensor, with one wait for each GPU (its tensors' sums read
    together) instead of one per tensor."""
    flags = [True] * len(tensors)
    on_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.device.type == "cpu":
            flags[i] = _all_finite(t)
        else:
            on_device.setdefault(t.device, []).append(i)
    for idx in on_device.values():
        sums = torch.stack([tensors[i].sum().double() for i in idx]).isfinite().tolist()
        for i, ok in zip(idx, sums):
            flags[i] = ok or bool(torch.isfinite(tensors[i]).all())
    return flags


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """Autocast switched off on every device type where the caller switched it on: an
    optimizer's step computed in bfloat16 matrix products (Muon's iterations, the LSTM's gates,
    the step-size controller) moved each update by a few percent, and a step must not depend on
    its caller's context."""
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda", "xpu", "mps"):
            try:
                on = torch.is_autocast_enabled(device)
            except (RuntimeError, TypeError, ValueError):  # (a device type this build lacks)
                continue
            if on:
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def refuse_a_tensor(params: Any) -> None:
    """torch.optim's ``TypeError`` for a tensor given as the parameters (iterating it would
    split it into its rows)."""
    if isinstance(params, Tensor):
        raise TypeError(
            "params argument given to the optimizer should be an iterable of Tensors or "
            f"dicts, but got {torch.typename(params)}"
        )


def _check_rate(name: str, value: float | Tensor) -> None:
    """A ``ValueError`` unless ``value`` (a number or a one-element tensor) is finite and at
    least 0: a NaN multiplier would reach every parameter."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor of {value.numel()} elements, not 1")
        value = float(value)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"Invalid {name}: {value}")


def _check_group_rates(group: dict[str, Any], index: int) -> None:
    """:func:`_check_rate` on a group's ``lr`` and ``weight_decay`` as they are now (a scheduler
    or the user may have set them since): a NaN or negative rate would reach every parameter.
    A tensor rate on an accelerator is not read (that would wait for the device)."""
    for key, name in (("lr", "learning rate"), ("weight_decay", "weight_decay value")):
        value = group.get(key, 0.0)
        if isinstance(value, Tensor) and value.device.type != "cpu":
            continue
        try:
            _check_rate(name, value)
        except ValueError as exc:
            raise ValueError(f"{exc} in param group {index}; no parameter was changed") from None


class NonFiniteGradientError(FloatingPointError):
    """A gradient (or the update computed from it) contains NaN or Inf."""


def _nonfinite_gradient(p: Tensor) -> NonFiniteGradientError:
    return NonFiniteGradientError(
        f"Non-finite gradient for a parameter of shape {tuple(p.shape)}; "
        "no parameter was changed in this step"
    )


def _warn_skipped(owner: object, skipped: int, stacklevel: int) -> None:
    """The warning of a step that left ``skipped`` tensors as they were (``nonfinite="skip"``);
    ``stacklevel`` counted from the caller of this function."""
    warnings.warn(
        f"{type(owner).__name__}: skipped the update of {skipped} parameter tensor(s) with "
        "non-finite gradients or updates (parameters and optimizer state left unchanged)",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


def _nonfinite_update(p: Tensor) -> NonFiniteGradientError:
    beyond = f" (or beyond the range of {p.dtype})" if p.dtype == torch.float16 else ""
    return NonFiniteGradientError(
        f"Non-finite update{beyond} for a parameter of shape {tuple(p.shape)} from a finite "
        "gradient; no parameter was changed in this step"
    )


class LearnedOptimizer(torch.optim.Optimizer):
    r"""A ``torch.optim.Optimizer`` that applies any :class:`~learned_opt.rules.UpdateRule`.

    For each parameter :math:`p` with gradient :math:`g` and per-parameter rule state
    :math:`s` (kept in ``self.state[p]``)::

        update, s = rule(g.flatten(), s)
        p += lr * update.view_as(p)

    ``lr`` is a multiplier on the rule's update (1.0 reproduces the rule as meta-trained); it lives
    in the param groups, so ``torch.optim.lr_scheduler`` schedules work unchanged (``OneCycleLR``
    and ``CyclicLR`` with ``cycle_momentum=False``: the rule has no momentum setting to cycle).
    The rule itself is frozen: the optimizer never changes its weights.

    Non-finite gradients and updates never reach the parameters. With ``nonfinite="skip"``
    (default) a parameter whose gradient holds NaN or Inf is left untouched, its state is not
    advanced, and a ``RuntimeWarning`` is issued; with ``nonfinite="raise"`` a
    :class:`NonFiniteGradientError` is raised before any parameter or state of that step is
    changed. The same holds for a tensor whose computed update is not finite, and for a float16
    parameter whose new value would leave float16's range (its step is then computed out of
    place, not by a rule's in-place fast path, so that its state can stay). (The rules shipped
    here produce finite updates for every finite gradient: they read gradients clamped to
    :func:`~learned_opt.rules.base.grad_bound`, so no square or sum of squares overflows.)

    Args:
        params: parameters or param-group dicts, as for any torch optimizer.
        rule: the update rule.
        lr: multiplier on the rule's update.
        nonfinite: ``"skip"`` or ``"raise"``.
        state_dtype: storage dtype of the per-coordinate rule state: ``None`` (the dtype the
            step is computed in: the parameter's, float32 for float16 and bfloat16),
            ``torch.float32`` or ``torch.bfloat16`` (about half the memory of float32: the
            moving averages too slow for bfloat16, whose weight per step is below half its last
            place, stay in float32, see :meth:`~learned_opt.rules.UpdateRule.precise_keys`).
            The update is always computed in the parameter's dtype (float32 for float16 and
            bfloat16 parameters, each new value rounded once): the state is upcast for the
            computation and rounded back when stored.
        weight_decay: decoupled weight decay (as in AdamW): each step first multiplies the
            parameters by ``1 - lr * weight_decay``, then adds ``lr * update``. Per param group,
            schedulable. Since ``lr`` is a multiplier (1.0 by default), ``weight_decay`` is the
            fraction of the weights removed per step: ``AdamW(lr=1e-3, weight_decay=0.1)``
            decays as ``weight_decay=1e-4`` does here.
        maximize: maximize the objective (the rule reads the negated gradient).
        orthogonal: per param group: ``False`` shows the rule this group's parameters as flat
            vectors, not by their shape, so that a rule with Muon's direction for matrices
            (``LSTMCorrectedAdamConfig.orthogonal``, the default weights') moves them along its
            vector direction (Adam's) instead. The usual Muon recipe keeps embeddings and the
            output layer there. Read when a parameter's state is created (its first step or a
            loaded state); no effect on rules that do not read shapes.
        total_steps: the run's length in steps, for rules that read how far training has gone
            (a :class:`~learned_opt.rules.ScheduledRule`: its warm-up and decay, hand-designed
            and learned, follow it); ``None``: unknown (such a rule then uses a horizon-free
            schedule, or none with ``unknown_horizon="base"``). Each parameter counts its own
            steps, those with a gradient (as Adam's bias correction does): parameters that join
            later start their own count, and one that skips steps (no gradient in them: a layer
            frozen for a while, a branch unused) reaches the end of its schedule only after
            ``total_steps`` of its own. :meth:`load_state_dict` keeps a ``total_steps`` given here
            (a resumed run lengthened or shortened: the schedule follows the new length) and
            otherwise takes the saved one. Steps past ``total_steps`` keep the schedule's last
            value; the warm-up and decay last whole steps (the default weights' 2% warm-up is
            none for runs of 50 steps or fewer).

    Raises:
        ValueError: empty parameter list, negative ``lr``, unknown ``nonfinite`` policy or
            ``state_dtype``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        rule: UpdateRule,
        *,
        lr: float = 1.0,
        nonfinite: str = "skip",
        state_dtype: torch.dtype | None = None,
        weight_decay: float = 0.0,
        maximize: bool = False,
        orthogonal: bool = True,
        total_steps: int | None = None,
    ) -> None:
        if total_steps is not None:
            if int(total_steps) != total_steps or total_steps < 1:
                raise ValueError(f"Invalid total_steps: {total_steps} (must be an integer >= 1)")
            if not getattr(rule, "reads_horizon", False):
                raise ValueError(
                    f"total_steps was given, but the {rule.kind!r} rule does not read the run's "
                    "length; use weights of a horizon-aware rule or leave total_steps out"
                )
        self.total_steps = None if total_steps is None else int(total_steps)
        _check_rate("weight_decay value", weight_decay)
        if not any(state_dtype is d for d in STATE_DTYPES):
            raise ValueError(
                f"Invalid state_dtype: {state_dtype!r}; use None (the parameters' dtype), "
                "torch.float32 or torch.bfloat16"
            )
        _check_rate("learning rate", lr)
        refuse_a_tensor(params)
        if nonfinite not in _NONFINITE_POLICIES:
            raise ValueError(
                f"Invalid nonfinite policy: {nonfinite!r}; use one of {_NONFINITE_POLICIES}"
            )
        if not isinstance(rule, UpdateRule):
            raise TypeError(f"rule must be an UpdateRule, got {type(rule).__name__}")
        self.rule = copy.deepcopy(rule).requires_grad_(False)
        nonfinite_weights = self.rule.nonfinite_weights()
        if nonfinite_weights:
            raise ValueError(f"The rule's weights are not finite: {nonfinite_weights}")
        self.nonfinite = nonfinite
        self.state_dtype = state_dtype
        self._rule_copies: dict[tuple[torch.device, torch.dtype], UpdateRule] = {}
        defaults = {"lr": lr, "weight_decay": weight_decay, "maximize": bool(maximize)}
        super().__init__(params, {**defaults, "orthogonal": bool(orthogonal)})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, after checking the group's ``lr`` and ``weight_decay`` (finite, at least 0)
        and its parameters (real floating point): a group that fails is not added."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else params
        if not isinstance(params, set):  # (torch refuses sets: their order is arbitrary)
            params = list(params)  # once: an iterator is consumed here
            for p in params:
                if isinstance(p, tuple) and len(p) == 2:  # named parameters: (name, tensor)
                    p = p[1]
                if isinstance(p, Tensor) and not p.is_floating_point():
                    raise TypeError(
                        f"{type(self).__name__} optimizes real floating-point parameters, not "
                        f"{p.dtype} (a complex parameter can be optimized as "
                        "torch.view_as_real of it)"
                    )
        _check_rate("learning rate", param_group.get("lr", 0.0))
        _check_rate("weight_decay value", param_group.get("weight_decay", 0.0))
        super().add_param_group({**param_group, "params": params})

    def _rule_for(self, p: Tensor) -> UpdateRule:
        """The rule on ``p``'s device in the dtype ``p`` is computed in (cached copies; the
        original stays as it is)."""
        dtype = _compute_dtype(p.dtype)
        ref = next(iter(self.rule.parameters()), None)
        if ref is None or (ref.device == p.device and ref.dtype == dtype):
            return self.rule
        key = (p.device, dtype)
        if key not in self._rule_copies:
            self._rule_copies[key] = copy.deepcopy(self.rule).to(device=p.device, dtype=dtype)
        return self._rule_copies[key]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Apply one update to every parameter that has a gradient.

        Each parameter tensor's update and new state are computed first and committed only if the
        update is finite: a tensor whose gradient or update is not finite keeps its values and its
        state (``nonfinite="skip"``), or the step raises :class:`NonFiniteGradientError` before
        any parameter or state is changed (``nonfinite="raise"``).

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with autocast_off():  # the rule's products in its own dtype, whatever the caller's
            self._step()
        return loss

    def _step(self) -> None:
        """:meth:`step` after its closure."""

        # Check every gradient first, so that "raise" leaves the model and state untouched.
        work: list[tuple[Tensor, dict[str, Any]]] = []
        for i, group in enumerate(self.param_groups):
            _check_group_rates(group, i)
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients; "
                        "use dense gradients (e.g. nn.Embedding(sparse=False))"
                    )
                if grad.shape != p.shape:
                    raise ValueError(
                        f"Gradient of shape {tuple(grad.shape)} does not match its parameter of "
                        f"shape {tuple(p.shape)}"
                    )
                work.append((p, group))
        finite = _finite_flags([p.grad for p, _ in work])
        if self.nonfinite == "raise" and not all(finite):
            raise _nonfinite_gradient(work[finite.index(False)][0])
        skipped = finite.count(False)
        work = [item for item, ok in zip(work, finite) if ok]

        # With "raise", nothing is committed until every update is known to be finite.
        pending: list[tuple[Tensor, dict[str, Any], Tensor, dict[str, Any]]] = []
        checked = 0  # how many of the pending updates are known to be finite
        if self.nonfinite == "raise":
            # The steps computed out of place first, and checked before any step in place
            # changes a state: one that fails then leaves every state as it was.
            work.sort(key=lambda item: self._in_place(item[0]))
        for p, group in work:
            state = self.state[p]
            rule = self._rule_for(p)
            flat = p.grad.reshape(-1).to(_compute_dtype(p.dtype))
            if group["maximize"]:
                flat = -flat
            if len(state) == 0:
                state.update(self._fresh_state(rule, p, group, like=flat))
                self._cast_state(rule, state)
            if self._in_place(p):
                # Such rules' updates are bounded by construction (a tanh-bounded hidden
                # state times a linear read-out), so the check below cannot fail. (A float16
                # parameter's can: its new value may leave the range, below; its step is
                # computed out of place, so that the state stays as it was then.)
                if self.nonfinite == "raise" and checked < len(pending):
                    self._raise_if_nonfinite(pending[checked:])
                    checked = len(pending)
                update, new_state = rule.step_(flat, state), None
            elif (two_pass := self._checked_step(rule, p, flat, state)) is not None:
                update, new_state = two_pass
            elif rule.tensor_aware:  # reads whole-tensor statistics: the tensor in one chunk
                update, new_state = self._chunked_step(rule, flat, state, max(1, flat.numel()))
            else:
                update, new_state = self._chunked_step(rule, flat, state)
            if p.dtype == torch.float16:
                # A finite update (in float32) can still take a float16 parameter past its range
                # (65,504), as a large ``lr`` does: its new value is what is checked and written.
                update = self._new_value(p, group, update)
            if p.device.type == "cpu":  # checked at once (a GPU tensor's below, together)
                if not _all_finite(update):
                    if self.nonfinite == "raise":
                        raise _nonfinite_update(p)
                    skipped += 1
                    continue
                if self.nonfinite == "skip":  # committed at once: the update's memory is reused
                    self._commit(p, group, update, state, new_state)
                    continue
            pending.append((p, group, update, new_state))
        # The rest (GPU tensors'; with "raise", every tensor's): GPU tensors checked together.
        if self.nonfinite == "raise":
            self._raise_if_nonfinite(pending[checked:])
            finite = [True] * len(pending)
        else:
            finite = _finite_flags([update for _, _, update, _ in pending])
        skipped += finite.count(False)
        for (p, group, update, new_state), ok in zip(pending, finite):
            if ok:
                self._commit(p, group, update, self.state[p], new_state)
        if skipped:
            _warn_skipped(self, skipped, stacklevel=5)  # (through torch's step wrappers)

    def _in_place(self, p: Tensor) -> bool:
        """Whether ``p`` steps in place (its rule's fused step; not for float16, whose new
        value is checked before its state changes)."""
        return hasattr(self._rule_for(p), "step_") and p.dtype != torch.float16

    def _checked_step(
        self, rule: UpdateRule, p: Tensor, flat: Tensor, state: dict[str, Any]
    ) -> tuple[Tensor, _StepState] | None:
        """A large float16 parameter's update computed in chunks of coordinates with its state
        left as it was (its new value is checked first), and the step that takes it in place
        once it is committed: the arithmetic twice, with temporaries of a chunk's size instead
        of the whole tensor's (hundreds of bytes a coordinate). ``None`` for a tensor of at
        most :attr:`chunk_size` coordinates, or where its rule has no such step."""
        if p.dtype != torch.float16 or p.numel() <= self.chunk_size:
            return None
        chunked = getattr(rule, "chunked_step_", None)
        update = None if chunked is None else chunked(flat, state, write=False)
        return None if update is None else (update, _StepState(chunked, flat))

    @staticmethod
    def _raise_if_nonfinite(pending: list[tuple[Tensor, Any, Tensor, Any]]) -> None:
        """:class:`NonFiniteGradientError` for the first non-finite update of ``pending``."""
        finite = _finite_flags([update for _, _, update, _ in pending])
        if not all(finite):
            raise _nonfinite_update(pending[finite.index(False)][0])

    def _fresh_state(
        self, rule: UpdateRule, p: Tensor, group: dict[str, Any], *, like: Tensor
    ) -> dict[str, Any]:
        """A fresh rule state for parameter ``p`` of ``group``, computed like ``like``: told
        the run's length (a rule that reads it) and ``p``'s shape (a rule that reads it, unless
        the group's ``orthogonal`` is off)."""
        kwargs: dict[str, Any] = {}
        if getattr(rule, "reads_horizon", False):
            kwargs["total_steps"] = self.total_steps
        if rule.reads_shape and group.get("orthogonal", True):
            kwargs["shape"] = tuple(p.shape)
        return rule.init_state(p.numel(), like=like, **kwargs)

    @staticmethod
    def _commit(
        p: Tensor,
        group: dict[str, Any],
        update: Tensor,
        state: dict[str, Any],
        new_state: dict[str, Any] | _StepState | None,
    ) -> None:
        """Store the new state and apply decoupled weight decay and the update to ``p`` (for a
        float16 ``p``, ``update`` is its new value: :meth:`_new_value`)."""
        if isinstance(new_state, _StepState):
            new_state.take(state)
        elif new_state is not None:
            state.update(new_state)
        if p.dtype == torch.float16:
            p.copy_(update.view(p.shape))
            return
        if p.dtype == torch.bfloat16:  # the new value computed in float32, rounded once
            p.copy_(LearnedOptimizer._new_value(p, group, update).view(p.shape))
            return
        lr = _scalar(group["lr"])
        if group["weight_decay"] != 0:
            p.mul_(1 - lr * group["weight_decay"])
        p.add_(update.view(p.shape).to(p.dtype), alpha=lr)

    @staticmethod
    def _new_value(p: Tensor, group: dict[str, Any], update: Tensor) -> Tensor:
        """``p``'s value after decoupled weight decay and ``update`` (flat, in the compute
        dtype), computed there and returned flat in ``p``'s dtype: Inf where it leaves that
        dtype's range."""
        lr = _scalar(group["lr"])
        new = p.detach().reshape(-1).to(update.dtype)  # a copy: float16 -> float32
        if group["weight_decay"] != 0:
            new.mul_(1 - lr * group["weight_decay"])
        return new.add_(update, alpha=lr).to(p.dtype)

    #: Coordinates per call of a rule without an in-place ``step_``: its temporaries (e.g. a
    #: (chunk, 4H) gate matrix) stay small enough to be reused by the allocator and to sit in
    #: cache, instead of fresh tensors the size of the whole parameter every step.
    chunk_size: int = 8192

    def _chunked_step(
        self, rule: UpdateRule, flat: Tensor, state: dict[str, Any], chunk: int | None = None
    ) -> tuple[Tensor, dict[str, Any]]:
        """``rule(flat, state)`` in chunks of ``chunk`` coordinates (default
        :attr:`chunk_size`; valid because rules are coordinatewise, and a tensor-aware rule gets
        the whole tensor as one chunk). Returns the update and the new state (per-coordinate
        entries in their storage dtype); ``state`` itself is not changed."""
        coord = {
            k for k, v in state.items() if isinstance(v, Tensor) and rule.coord_dim(k) is not None
        }
        n = flat.numel()
        chunk = chunk or self.chunk_size
        if chunk >= n:  # one call: the rule's new tensors become the state
            sub = {
                k: self._compute_value(rule, k, v, flat) if k in coord else v
                for k, v in state.items()
            }
            update, out_state = checked_output(rule, rule(flat, sub), n)
            new_state = {
                k: rounded(v, state[k].dtype)
                if k in coord and self._stored(rule, k, state[k])
                else v
                for k, v in out_state.items()
            }
            return update, new_state
        update = torch.empty_like(flat)
        new_state: dict[str, Any] = {}
        returned: set[str] | None = None  # the per-coordinate entries the rule returns
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            sub = {}
            for k, v in state.items():
                if k in coord:
                    v = v.narrow(rule.coord_dim(k), start, end - start)
                    sub[k] = self._compute_value(rule, k, v, flat)
                else:
                    sub[k] = v
            out, out_state = checked_output(rule, rule(flat[start:end], sub), end - start)
            update[start:end] = out
            mine = coord & set(out_state)
            if returned is None:  # (an entry it leaves out keeps its value, as in one call)
                returned = mine
                new_state.update({k: torch.empty_like(state[k]) for k in mine})
            elif mine != returned:
                raise RuntimeError(
                    f"the {rule.kind!r} rule returned the state entries {sorted(mine)} for one "
                    f"chunk of a tensor and {sorted(returned)} for another: a rule returns the "
                    "same entries whatever its input"
                )
            for k, v in out_state.items():
                if k in coord:
                    store_(new_state[k].narrow(rule.coord_dim(k), start, end - start), v)
                else:
                    new_state[k] = v  # e.g. the step counter: the same in every chunk
        return update, new_state

    def _stored(self, rule: UpdateRule, key: str, value: Any) -> bool:
        """Whether ``state[key]`` is per-coordinate state kept in ``state_dtype`` (or, for the
        rule's :meth:`~learned_opt.rules.UpdateRule.precise_keys`, in float32)."""
        return (
            self.state_dtype is not None
            and isinstance(value, Tensor)
            and value.is_floating_point()
            and rule.coord_dim(key) is not None
        )

    def _storage_dtype(self, rule: UpdateRule, key: str) -> torch.dtype | None:
        if self.state_dtype is None:
            return None
        return torch.float32 if key in rule.precise_keys() else self.state_dtype

    def _cast_state(self, rule: UpdateRule, state: dict[str, Any]) -> None:
        for key, value in state.items():
            dtype = self._storage_dtype(rule, key)
            if self._stored(rule, key, value) and value.dtype != dtype:
                state[key] = rounded(value, dtype)

    def _compute_value(self, rule: UpdateRule, key: str, value: Any, like: Tensor) -> Any:
        return value.to(like.dtype) if self._stored(rule, key, value) else value

    def state_dict(self) -> dict[str, Any]:
        """The torch optimizer state plus the rule record (so a resume needs nothing else),
        with the weights' metadata of an :class:`~learned_opt.LSTMOptimizer`."""
        with _hooks_held(self, "_optimizer_state_dict_post_hooks") as post_hooks:
            sd = super().state_dict()
        sd["rule"] = rule_to_dict(self.rule, getattr(self, "metadata", None))
        sd["total_steps"] = self.total_steps  # (also where no parameter has a state yet)
        for hook in post_hooks:  # (torch's order: they see the whole state dict, the rule too)
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (also one read back with ``torch.load(weights_only=True)``):
        the parameter groups' settings, each parameter's state, and the rule as saved (its
        weights and settings: the run continues exactly; a ``UserWarning`` when they are not
        this optimizer's). Nothing changes if it does not fit. Load-state-dict hooks run as
        torch's do: the pre-hooks' result is what is loaded, the post-hooks run at the end."""
        state_dict = dict(state_dict)
        for hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            result = hook(self, state_dict)
            if result is not None:
                state_dict = dict(result)
        record = state_dict.pop("rule", None)
        saved_total = state_dict.pop("total_steps", None)
        rule = None
        if record is not None:
            rule = rule_from_dict(record, expected_kind=self.rule.kind, source="state_dict")
        self._check_saved_state(rule or self.rule, state_dict)
        hooks = ("_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")
        with _hooks_held(self, *hooks) as post_hooks:  # (each run once, here)
            super().load_state_dict(state_dict)  # checks the groups before changing anything
        if rule is not None:
            if not _same_rule(rule, self.rule):
                warnings.warn(
                    "The state dict was saved with other weights than this optimizer's (another "
                    "rule or other values): the run continues with the saved ones, as saved "
                    "(opt.metadata describes them)",
                    UserWarning,
                    stacklevel=2,
                )
            self.rule = rule.requires_grad_(False)
            self._rule_copies.clear()
            if hasattr(self, "metadata"):  # the saved rule's (LSTMOptimizer's weights record)
                self.metadata = dict(record.get("metadata") or {})
        for group in self.param_groups:  # state dicts saved before these options existed
            group.setdefault("weight_decay", 0.0)
            group.setdefault("maximize", False)
            group.setdefault("orthogonal", True)
        # torch casts the loaded state to each parameter's dtype (float16 zeroes small second
        # moments, and a step count above 2048 loses its last bits); restore it from the saved
        # tensors instead: per-coordinate entries in the storage dtype, the others as saved.
        saved = state_dict.get("state", {})
        ids = (i for g in state_dict["param_groups"] for i in g["params"])
        params = (p for g in self.param_groups for p in g["params"])
        for i, p in zip(ids, params):
            if i not in saved:
                continue
            state, rule_p = self.state[p], self._rule_for(p)
            for key, value in saved[i].items():
                if not isinstance(value, Tensor):
                    continue
                dtype = value.dtype
                if value.is_floating_point() and rule_p.coord_dim(key) is not None:
                    dtype = self._storage_dtype(rule_p, key) or _compute_dtype(p.dtype)
                value = value.to(device=state[key].device, copy=True)
                state[key] = rounded(value, dtype) if value.dtype != dtype else value
        self._align_total_steps(saved_total)
        for hook in post_hooks:
            hook(self)

    def _check_saved_state(self, rule: UpdateRule, state_dict: dict[str, Any]) -> None:
        """A ``ValueError`` unless each saved parameter state is one ``rule`` keeps for that
        parameter: every entry of a fresh state there (the Muon layout and the run's length
        may differ), the per-coordinate ones of its size, a matrix layout of its shape.
        (Groups of other sizes are torch's to refuse.)"""
        saved, groups = state_dict.get("state", {}), state_dict.get("param_groups", [])
        if len(groups) != len(self.param_groups) or any(
            len(g["params"]) != len(mine["params"]) for g, mine in zip(groups, self.param_groups)
        ):
            return
        for g, mine in zip(groups, self.param_groups):
            for i, p in zip(g["params"], mine["params"]):
                if i not in saved or not saved[i]:
                    continue
                entries = saved[i]
                like = torch.empty(p.numel(), device="meta", dtype=_compute_dtype(p.dtype))
                fresh = self._fresh_state(rule, p, mine, like=like)
                where = f"the saved state of a parameter of shape {tuple(p.shape)}"
                missing = sorted(set(fresh) - set(entries) - {"matrix", "total_steps"})
                if missing:
                    raise ValueError(
                        f"{where} lacks {missing}: it was not saved by a {rule.kind!r} rule's "
                        "optimizer for this parameter; nothing was loaded"
                    )
                for key, value in entries.items():
                    want = fresh.get(key)
                    if key == "matrix" and isinstance(value, Tensor):
                        rows = p.shape[0] if p.dim() >= 2 else -1
                        if p.dim() < 2 or value.tolist() != [rows, p.numel() // rows]:
                            raise ValueError(
                                f"{where} moves it as a {value.tolist()} matrix; nothing was loaded"
                            )
                    elif (
                        isinstance(value, Tensor)
                        and isinstance(want, Tensor)
                        and rule.coord_dim(key) is not None
                        and value.shape != want.shape
                    ):
                        raise ValueError(
                            f"{where} has {key!r} of shape {tuple(value.shape)}, not "
                            f"{tuple(want.shape)}; nothing was loaded"
                        )

    def _align_total_steps(self, saved_total: int | None = None) -> None:
        """After a load: a ``total_steps`` given to this optimizer replaces the run's length
        saved in each parameter's state (a run lengthened or shortened on resume); without one,
        the optimizer takes the saved length (when the states agree; where no parameter had a
        state yet, the saved optimizer's, ``saved_total``), for parameters added later too."""
        states = [s for s in self.state.values() if isinstance(s.get("total_steps"), Tensor)]
        if self.total_steps is not None:
            for s in states:
                s["total_steps"] = torch.full_like(s["total_steps"], float(self.total_steps))
            return
        saved = {float(s["total_steps"]) for s in states}
        if len(saved) == 1 and (length := saved.pop()) > 0:
            self.total_steps = int(length)
        elif (
            not states
            and isinstance(saved_total, int)
            and saved_total >= 1
            and getattr(self.rule, "reads_horizon", False)
        ):
            self.total_steps = saved_total

    def __getstate__(self) -> dict[str, Any]:
        """torch's optimizer state plus this optimizer's own settings (for ``copy.deepcopy``
        and ``pickle``)."""
        state = super().__getstate__()
        own = {k: v for k, v in self.__dict__.items() if not k.startswith("_") and k not in state}
        return {**state, **own}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._rule_copies = {}


class _StepState:
    """The in-place step of a tensor's state whose update was computed and checked before it
    (:meth:`LearnedOptimizer._checked_step`): the same arithmetic again, writing the state."""

    def __init__(self, chunked_step: Callable[..., Any], grad: Tensor) -> None:
        self.chunked_step, self.grad = chunked_step, grad

    def take(self, state: dict[str, Any]) -> None:
        self.chunked_step(self.grad, state, write=True)


@contextlib.contextmanager
def _hooks_held(opt: torch.optim.Optimizer, *names: str) -> Iterator[list[Callable[..., Any]]]:
    """Empties the optimizer's hook tables ``names`` while the block runs (torch's method it
    calls then runs none of them) and yields the last table's hooks, for the caller to run."""
    held = {name: getattr(opt, name) for name in names}
    for name in names:
        setattr(opt, name, OrderedDict())
    try:
        yield list(held[names[-1]].values())
    finally:
        for name, table in held.items():
            setattr(opt, name, table)


def _same_rule(a: UpdateRule, b: UpdateRule) -> bool:
    """Whether two rules are the same kind, settings and weights (buffers included)."""
    if type(a) is not type(b) or a.kind != b.kind or a.config() != b.config():
        return False
    mine, theirs = a.state_dict(), b.state_dict()
    return mine.keys() == theirs.keys() and all(
        mine[k].shape == theirs[k].shape and torch.equal(mine[k].cpu(), theirs[k].cpu())
        for k in mine
    )
