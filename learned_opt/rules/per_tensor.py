r"""Per-tensor statistics of :class:`~learned_opt.rules.LSTMCorrectedAdamRule`: gradient
clipping at a multiple of a tensor's running RMS norm, and the step-size adaptation that grows a
tensor's step while its gradient keeps pointing along its last update.

Both read sums over each parameter tensor's coordinates. The rule sees either one tensor (the
drop-in optimizer: ``ids`` is ``None``) or the unroll's flat vector of several tensors, where
``ids`` gives each coordinate's tensor index. The per-tensor state (the log step size ``s``, the
running mean square ``grad_fast`` of the gradient norm and its peak ``grad_peak``) holds one
number per tensor, shape ``(T,)``.

Everything here is differentiable (the unroll backpropagates through it) and keeps the operation
order that the shipped weights were meta-trained and tested with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base import RuleState, safe_sqrt
from .corrected_adam_config import LSTMCorrectedAdamConfig

__all__ = [
    "CONTROLLER_FEATURES",
    "Controller",
    "PER_TENSOR_KEYS",
    "Precomputed",
    "adapt_from_sums",
    "adapt_log_step",
    "adapt_rate",
    "clip",
    "clip_limit",
    "clip_scale",
    "initial_log_step",
    "per_tensor_state",
    "tensor_sums",
]

#: State entries with one number per parameter tensor.
PER_TENSOR_KEYS = ("log_step", "grad_fast", "grad_peak", "cos_avg")

#: Inputs of the learned gain on the adaptation rate (``controller_hidden``), per tensor: the
#: cosine, its bias-corrected running mean (beta 0.9), ``log(norm / peak) / 10`` of the gradient
#: norm (floored at -1), ``s / S``, ``exp(-t / tau)`` and ``log(t) / log(10^4)``; with
#: ``controller_size``, a seventh: the tensor's log size (:func:`adapt_from_sums`).
CONTROLLER_FEATURES = 6

#: The learned controller: features (T, 6) -> (log gain (T,) or ``None``: no hand-designed
#: adaptation to gain, ``lr_adapt_learned``; drift (T,) or ``None``).
Controller = Callable[[Tensor], tuple[Tensor | None, Tensor | None]]


@dataclass(frozen=True)
class Precomputed:
    """The per-tensor parts of one tensor's step, computed over its whole gradient before the
    rule's forward steps a chunk of its coordinates (the drop-in optimizer's step in chunks,
    :func:`~learned_opt.rules.corrected_adam_step.chunked_step_`)."""

    #: The gradient clipping's factor (1,), or ``None`` where this step does not clip.
    clip: Tensor | None = None
    #: The new log step size (1,), or ``None`` without the step-size adaptation.
    log_step: Tensor | None = None
    #: The new per-tensor state entries (``log_step``, ``grad_fast``, ...).
    new_state: RuleState = field(default_factory=dict)
    #: This chunk's orthogonalized direction (a matrix's, ``orthogonal``), or ``None``.
    direction: Tensor | None = None


def tensor_sums(products: Tensor, ids: Tensor | None, count: int) -> Tensor:
    """Sums of the rows of ``products`` (k, n) over each tensor's coordinates: (k, ``count``)
    (``ids`` None: the coordinates are one tensor, (k, 1))."""
    if ids is None:
        return products.sum(dim=1, keepdim=True)
    return products.new_zeros(products.shape[0], count).index_add_(1, ids, products)


def per_coordinate(values: Tensor, ids: Tensor | None) -> Tensor:
    """Per-tensor ``values`` (T,) at each coordinate (``ids`` None: (1,), which broadcasts)."""
    return values if ids is None else values[ids]


def warmup(extra: float, t: float, steps: float) -> float:
    """``1 + extra exp(-t / steps)``: the factor of both warm-ups (the adaptation rate's and
    the clip threshold's)."""
    return 1.0 + extra * math.exp(-t / steps)


def clip_limit(cfg: LSTMCorrectedAdamConfig, t: float) -> float:
    """``Q_t``: the gradient clipping's threshold on the squared norm, in units of the running
    second moment, at step ``t`` (its warm-up included)."""
    return cfg.grad_clip * warmup(cfg.grad_clip_warmup, t, cfg.lr_adapt_warmup_steps)


def adapt_rate(cfg: LSTMCorrectedAdamConfig, t: float) -> float:
    """``kappa_t``: the step-size adaptation's rate at step ``t`` (its warm-up included)."""
    return cfg.lr_adapt * warmup(cfg.lr_adapt_warmup, t, cfg.lr_adapt_warmup_steps)


def initial_log_step(cfg: LSTMCorrectedAdamConfig, numels: Sequence[int]) -> list[float]:
    """Each tensor's log step size before its first step: ``0.5 log(lr_size_ref / n)`` for a
    tensor of ``n > lr_size_ref`` coordinates (at least ``-lr_adapt_bound``), else 0."""
    ref, bound = cfg.lr_size_ref, cfg.lr_adapt_bound
    return [max(-bound, 0.5 * math.log(ref / n)) if 0 < ref < n else 0.0 for n in numels]


def clip(
    cfg: LSTMCorrectedAdamConfig,
    grad: Tensor,
    v_hat: Tensor,
    ids: Tensor | None,
    count: int,
    t: float,
) -> Tensor:
    """``grad`` with each tensor's norm clipped at ``sqrt(Q_t)`` times its running RMS norm
    ``sqrt(sum v_hat)``, ``Q_t = grad_clip (1 + grad_clip_warmup exp(-t / tau))``; unchanged
    where that norm is zero (no history yet)."""
    g2, ref = tensor_sums(torch.stack((grad * grad, v_hat)), ids, count)
    return grad * per_coordinate(clip_scale(cfg, g2, ref, t), ids)


def clip_scale(cfg: LSTMCorrectedAdamConfig, g2: Tensor, ref: Tensor, t: float) -> Tensor:
    """The factor on each tensor's gradient, from the sums of its squares ``g2`` and of the
    bias-corrected second moment of the last step ``ref`` (per tensor)."""
    limit = clip_limit(cfg, t) * ref
    # safe_sqrt: a zero meta-gradient where the ratio is 0, not 0 * inf = nan
    factor = safe_sqrt(limit / g2.clamp_min(1e-30)).clamp(max=1.0)
    return torch.where(ref > 0, factor, torch.ones_like(factor))


def adapt_log_step(
    cfg: LSTMCorrectedAdamConfig,
    grad: Tensor,
    state: RuleState,
    new_state: RuleState,
    ids: Tensor | None,
    count: int,
    t: float,
    controller: Controller | None = None,
) -> Tensor:
    """The new log step size per tensor, ``s <- clip(s + kappa_t c, +-S)``, with ``c`` the
    cosine of ``-grad`` and the previous update ``state["prev"]`` (shaped by
    ``lr_adapt_shrink`` and the slowdown; with a ``controller`` of outputs ``(delta, d)``,
    ``kappa_t (c exp(delta) + d)``, and of outputs ``(None, d)``, ``kappa_t d``, see
    :data:`CONTROLLER_FEATURES`); records ``log_step`` (and
    ``grad_fast``, ``grad_peak``, ``cos_avg``) in ``new_state`` and returns ``log_step``."""
    prev = state["prev"]
    dot, g2, p2 = tensor_sums(torch.stack((-grad * prev, grad * grad, prev * prev)), ids, count)
    sizes = None
    if cfg.controller_size and controller is not None:
        sizes = (
            grad.new_full((1,), grad.numel()) if ids is None
            else torch.bincount(ids, minlength=count).to(grad)
        )  # fmt: skip
    return adapt_from_sums(cfg, dot, g2, p2, state, new_state, t, controller, sizes)


def adapt_from_sums(
    cfg: LSTMCorrectedAdamConfig,
    dot: Tensor,
    g2: Tensor,
    p2: Tensor,
    state: RuleState,
    new_state: RuleState,
    t: float,
    controller: Controller | None = None,
    sizes: Tensor | None = None,
) -> Tensor:
    """:func:`adapt_log_step` from the per-tensor sums of ``-grad * prev`` (``dot``),
    ``grad**2`` (``g2``) and ``prev**2`` (``p2``); ``sizes``: each tensor's number of
    coordinates, which a controller reads with ``controller_size`` (required then)."""
    # cos = 0 where either vector is zero (the first step: no previous update yet; a tensor
    # with a zero gradient); safe_sqrt: a zero meta-gradient there, not 0 * inf = nan.
    # |g|^2 |p|^2 can overflow where each factor does not: then |g| |p| (the same value up
    # to rounding; the product form is kept where it is finite, for identical steps).
    norms = g2 * p2
    norms = torch.where(torch.isinf(norms), safe_sqrt(g2) * safe_sqrt(p2), safe_sqrt(norms))
    cos = dot / norms.clamp_min(1e-30)
    raw_cos = cos
    if cfg.lr_adapt_shrink != 1.0:
        cos = cos + (cfg.lr_adapt_shrink - 1.0) * (cos + cfg.lr_adapt_margin).clamp(max=0.0)
    if cfg.lr_adapt_slowdown > 0:
        fast = state["grad_fast"] * 0.9 + 0.1 * g2
        norm = safe_sqrt(fast / (1 - 0.9**t))
        peak = torch.maximum(state["grad_peak"], norm)
        new_state["grad_fast"] = fast
        new_state["grad_peak"] = peak
        slow = (cos > 0) & (norm * cfg.lr_adapt_slowdown < peak)
        cos = torch.where(slow, cos * cfg.lr_adapt_slowdown_rate, cos)
    rate = adapt_rate(cfg, t)
    bound = cfg.lr_adapt_bound
    change = rate * cos
    if controller is not None:  # (the config guarantees the slowdown's norm and peak)
        avg = state["cos_avg"] * 0.9 + 0.1 * raw_cos
        new_state["cos_avg"] = avg
        ratio = (norm / peak.clamp_min(1e-30)).clamp_min(math.exp(-10.0))
        const = torch.stack(  # filled on the device: no copy from the host to wait for
            (
                torch.full_like(cos, math.exp(-t / cfg.lr_adapt_warmup_steps)),
                torch.full_like(cos, math.log(t) / math.log(1e4)),
            ),
            -1,
        )
        feats = torch.stack(
            (raw_cos, avg / (1 - 0.9**t), torch.log(ratio) / 10, state["log_step"] / bound), -1
        )
        columns = [feats, const]
        if cfg.controller_size:
            if sizes is None:
                raise ValueError("controller_size: the controller reads the tensors' sizes")
            columns.append((torch.log(sizes.to(cos) / 1e3) / math.log(1e3))[:, None])
        delta, drift = controller(torch.cat(columns, -1))
        if delta is None:  # lr_adapt_learned: the drift is the whole adaptation
            assert drift is not None
            change = rate * drift
        else:
            change = change * torch.exp(delta)
            if drift is not None:
                change = change + rate * drift
    log_step = (state["log_step"] + change).clamp(-bound, bound)
    new_state["log_step"] = log_step
    return log_step


def per_tensor_state(state: RuleState, key: str, ids: Tensor | None, count: int) -> Tensor:
    """``state[key]`` with one entry per tensor (``count`` of them).

    States written before the per-tensor layout kept these numbers once per coordinate (the
    same value over each tensor's coordinates): such an entry is read at each tensor's first
    coordinate.
    """
    value = state[key]
    if value.dim() == 1 and value.shape[0] == count:
        return value
    flat = value.reshape(-1)
    if ids is None:
        return flat[:1] if flat.numel() else flat.new_zeros(1)
    first = torch.full((count,), -1, dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, ids, torch.arange(ids.numel(), device=ids.device), "amin",
                          include_self=False)  # fmt: skip
    return torch.where(first >= 0, flat[first.clamp_min(0)], flat.new_zeros(()))
