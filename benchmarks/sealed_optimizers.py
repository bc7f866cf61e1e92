"""The optimizers of the sealed benchmark (``sealed.py``): the tuning-free optimizers' packages,
Muon (orthogonalized momentum for matrices, Adam for the rest), the learned optimizer with its
read-out zeroed (an ablation), and the warm-up + cosine schedule of tuned Adam, of Muon and of
the learned optimizer told its horizon."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from learned_opt import LSTMOptimizer
from learned_opt.evaluate import OptimizerFactory, takes_names
from learned_opt.rules import UpdateRule
from learned_opt.rules.orthogonal import orthogonal_direction
from learned_opt.rules.scheduled import ScheduledRule

_BENCH_PACKAGES = {
    "prodigyopt": "prodigyopt",
    "dadaptation": "dadaptation",
    "schedulefree": "schedulefree",
}


class MissingBenchDependencies(ImportError):
    """A tuning-free optimizer's package is not installed."""


def require_bench_packages() -> dict[str, Any]:
    """The modules of the tuning-free optimizers.

    Raises:
        MissingBenchDependencies: naming the missing packages and the command that installs them.
    """
    import importlib

    modules, missing = {}, []
    for module, package in _BENCH_PACKAGES.items():
        try:
            modules[module] = importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise MissingBenchDependencies(
            f"benchmarks/sealed.py compares against tuning-free optimizers whose packages are "
            f"missing: {', '.join(missing)}. Install them with `pip install "
            f"{' '.join(_BENCH_PACKAGES.values())}` (or `pip install -e .[bench]`)."
        )
    return modules


def zero_readout(rule: UpdateRule) -> UpdateRule:
    """A copy of ``rule`` with its learned read-out at zero: the hand-designed part alone.

    Zeroes every ``out_weight`` and ``out_bias`` of the rule and its submodules (the LSTM's
    read-out; for :class:`~learned_opt.rules.GeneralLSTMRule` that makes the step its nominal
    Adam direction times ``exp(0)``, with its hand-designed step-size adaptation and clipping
    kept; with ``orthogonal_mix``, its mix read-out too: Muon's direction for matrices; with
    ``direction_correction``, its correction read-out: the direction unturned); for the
    paper's :class:`~learned_opt.rules.LSTMRule`, whose whole update is learned, a zero update),
    the last layer of a learned gain on the step-size adaptation (``controller_hidden``: the gain
    1) and of its drift (``controller_drift``: none; with ``lr_adapt_learned``, its linear paths
    too, from the statistics and from the size: no adaptation at all), and the last layer of a
    :class:`~learned_opt.rules.ScheduledRule`'s schedule and its linear path (the identity
    schedule).

    Raises:
        ValueError: the rule has no read-out to zero.
    """
    out = copy.deepcopy(rule)
    zeroed: list[str] = []
    with torch.no_grad():
        for name, module in out.named_modules():
            for attr in ("out_weight", "out_bias", "mix_weight", "mix_bias", "correction_weight",
                         "correction_bias"):  # fmt: skip
                value = getattr(module, attr, None)
                if isinstance(value, Tensor):
                    value.zero_()
                    zeroed.append(f"{name}.{attr}" if name else attr)
            if getattr(module, "controller_w1", None) is not None:  # the adaptation's control
                for attr in ("controller_w2", "controller_b2", "controller_drift_w",
                             "controller_drift_b", "controller_linear",
                             "controller_size_linear"):  # fmt: skip
                    value = getattr(module, attr, None)
                    if isinstance(value, Tensor):
                        value.zero_()
                zeroed.append(f"{name}.controller" if name else "controller")
            if isinstance(module, ScheduledRule):
                last = module.schedule[-1]
                last.weight.zero_()
                last.bias.zero_()
                if module.basis is not None:
                    module.basis.weight.zero_()
                zeroed.append(f"{name}.schedule" if name else "schedule")
    if not zeroed:
        raise ValueError(f"The {type(rule).__name__} has no learned read-out to zero")
    return out


def input_and_output_layers(named: list[tuple[str, Tensor]]) -> set[str]:
    """The names of a model's input and output layers among its ``(name, tensor)`` pairs (in
    the model's order): its first and last tensors of 2 or more dimensions, and every one whose
    name marks an embedding (``embed``, or ``pos`` for positions)."""
    matrices = [name for name, t in named if t.ndim >= 2]
    marked = {n for n in matrices if "embed" in n or n.split(".")[-1].startswith("pos")}
    return ({matrices[0], matrices[-1]} | marked) if matrices else set()


class MuonAdam(torch.optim.Optimizer):
    """Muon for tensors of 2 or more dimensions, Adam for the others, one learning rate.

    A tensor of shape ``(n, ...)`` is updated as an ``n x m`` matrix (``m`` the product of the
    other dimensions: a conv kernel's fan-in): Nesterov momentum 0.95, orthogonalized and
    scaled by :func:`~learned_opt.rules.orthogonal.orthogonal_direction` (by
    ``0.2 sqrt(max(n, m))``: a root mean square about Adam's, as in Liu et al., 2025, "Muon is
    scalable for LLM training"), which lets one tuned ``lr`` serve both parts. Vectors and
    scalars (biases, norm gains) take Adam's step (betas 0.9, 0.999).

    Args:
        params: tensors or param groups; with ``hidden_only``, ``(name, tensor)`` pairs in the
            model's order (``model.named_parameters()``).
        hidden_only: the usual recipe (Jordan et al., 2024): the input and output layers
            (:func:`input_and_output_layers`: embeddings, the first and last matrices) take
            Adam's step too, so Muon moves the hidden matrices alone. Without it every matrix
            is orthogonalized (the tensors' roles unknown).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        ns_steps: int = 5,
        hidden_only: bool = False,
    ) -> None:
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"Invalid Muon settings: lr={lr}, momentum={momentum}")
        self.adam_names: set[str] = set()
        if hidden_only:
            params = list(params)
            if not all(isinstance(x, tuple) and len(x) == 2 for x in params):
                raise ValueError("hidden_only needs (name, tensor) pairs in the model's order")
            self.adam_names = input_and_output_layers(params)
        defaults = {"lr": lr, "momentum": momentum, "betas": betas, "eps": eps, "ns": ns_steps}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            names = group.get("param_names") or [None] * len(group["params"])
            for p, name in zip(group["params"], names):
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if p.ndim >= 2 and name not in self.adam_names:
                    buf = state.setdefault("momentum", torch.zeros_like(p))
                    buf.mul_(mu).add_(g)
                    rows = p.shape[0]
                    nesterov = g.add(buf, alpha=mu).reshape(-1)
                    step = orthogonal_direction(nesterov, rows, p.numel() // rows, group["ns"])
                    p.add_(step.view_as(p), alpha=-lr)
                    continue
                b1, b2 = group["betas"]
                if not state:
                    state["t"] = 0
                    state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
                state["t"] += 1
                state["m"].lerp_(g, 1 - b1)
                state["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
                m_hat = state["m"] / (1 - b1 ** state["t"])
                v_hat = state["v"] / (1 - b2 ** state["t"])
                p.addcdiv_(m_hat, v_hat.sqrt().add_(group["eps"]), value=-lr)
        return loss


class WarmupCosine:
    """A torch optimizer mix-in: the ``lr`` of each param group at step ``t`` (from 1) is its
    initial ``lr`` times ``t / W`` during a linear warm-up of ``W`` steps, then times
    ``(1 + cos(pi (t - 1 - W) / (T - W))) / 2`` (the full rate at the first step after the
    warm-up, approaching 0 at the last step ``T = total_steps``: every step moves)."""

    def schedule(self, total_steps: int, warmup_steps: int) -> None:
        # (not ``self.total_steps``: the learned optimizer's own horizon, told to its rule)
        self.base_lrs = [float(g["lr"]) for g in self.param_groups]  # type: ignore[attr-defined]
        self.schedule_steps = int(total_steps)
        self.warmup_steps = max(0, min(int(warmup_steps), self.schedule_steps - 1))
        self.t = 0

    def factor(self, t: int) -> float:
        w, total = self.warmup_steps, self.schedule_steps
        if t <= w:
            return t / w
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - 1 - w) / max(1, total - w))))

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        self.t += 1
        for group, lr in zip(self.param_groups, self.base_lrs):  # type: ignore[attr-defined]
            group["lr"] = lr * self.factor(self.t)
        return super().step(closure)  # type: ignore[misc]


class WarmupCosineAdam(WarmupCosine, torch.optim.Adam):
    """Adam with :class:`WarmupCosine`'s schedule."""

    def __init__(
        self, params: list[Tensor], lr: float, total_steps: int, warmup_steps: int
    ) -> None:
        super().__init__(params, lr=lr)
        self.schedule(total_steps, warmup_steps)


class WarmupCosineMuon(WarmupCosine, MuonAdam):
    """:class:`MuonAdam` with :class:`WarmupCosine`'s schedule."""

    def __init__(
        self,
        params: list[Tensor],
        lr: float,
        total_steps: int,
        warmup_steps: int,
        hidden_only: bool = False,
    ) -> None:
        super().__init__(params, lr=lr, hidden_only=hidden_only)
        self.schedule(total_steps, warmup_steps)


class WarmupCosineLSTMOptimizer(WarmupCosine, LSTMOptimizer):
    """``LSTMOptimizer`` with :class:`WarmupCosine`'s schedule of ``schedule_steps`` on its
    multiplier ``lr``; ``kwargs`` are ``LSTMOptimizer``'s (its ``total_steps`` included)."""

    def __init__(
        self, params: list[Tensor], schedule_steps: int, warmup_steps: int, **kwargs: Any
    ) -> None:
        super().__init__(params, **kwargs)
        self.schedule(schedule_steps, warmup_steps)


def make_factories(
    rule: UpdateRule, steps: int, total_steps: bool, warmup_fraction: float
) -> dict[str, OptimizerFactory]:
    """Every optimizer of :data:`OPTIMIZERS` as ``factory(params, lr)`` for runs of ``steps``
    (for the learned optimizers ``lr`` is ``LSTMOptimizer``'s multiplier)."""
    mods = require_bench_packages()
    zeroed = zero_readout(rule)
    horizon = {"total_steps": steps} if total_steps else {}
    warmup = max(1, math.ceil(warmup_fraction * steps))

    return {
        "adam": lambda p, lr: torch.optim.Adam(p, lr=lr),
        "adam-cosine": lambda p, lr: WarmupCosineAdam(p, lr, steps, warmup),
        "muon": lambda p, lr: MuonAdam(p, lr=lr),
        "muon-cosine": lambda p, lr: WarmupCosineMuon(p, lr, steps, warmup),
        "muon-hidden": takes_names(lambda p, lr: MuonAdam(p, lr=lr, hidden_only=True)),
        "muon-hidden-cosine": takes_names(
            lambda p, lr: WarmupCosineMuon(p, lr, steps, warmup, hidden_only=True)
        ),
        "prodigy": lambda p, lr: mods["prodigyopt"].Prodigy(p, lr=1.0),
        "dadapt-adam": lambda p, lr: mods["dadaptation"].DAdaptAdam(p, lr=1.0),
        "schedule-free": lambda p, lr: mods["schedulefree"].AdamWScheduleFree(p),
        "learned": lambda p, lr: LSTMOptimizer(p, weights=rule, lr=lr, **horizon),
        "learned-zeroed": lambda p, lr: LSTMOptimizer(p, weights=zeroed, lr=lr, **horizon),
        "learned-cosine": lambda p, lr: WarmupCosineLSTMOptimizer(
            p, steps, warmup, weights=rule, lr=lr, **horizon
        ),
    }


#: The learning rate recorded for the tuning-free optimizers (their own documented defaults).
TUNING_FREE_LR = {"prodigy": 1.0, "dadapt-adam": 1.0, "schedule-free": 0.0025}
