"""The optimizers of the sealed benchmark (``sealed.py``): the tuning-free optimizers' packages,
the learned optimizer with its read-out zeroed (an ablation), and the warm-up + cosine schedule
of tuned Adam and of the learned optimizer told its horizon."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from learned_opt import LSTMOptimizer
from learned_opt.evaluate import OptimizerFactory
from learned_opt.rules import UpdateRule
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
    kept; for the paper's :class:`~learned_opt.rules.LSTMRule`, whose whole update is learned, a
    zero update), the last layer of a learned gain on the step-size adaptation
    (``controller_hidden``: the gain 1) and of its drift (``controller_drift``: none), and the
    last layer of a
    :class:`~learned_opt.rules.ScheduledRule`'s schedule (the identity schedule).

    Raises:
        ValueError: the rule has no read-out to zero.
    """
    out = copy.deepcopy(rule)
    zeroed: list[str] = []
    with torch.no_grad():
        for name, module in out.named_modules():
            for attr in ("out_weight", "out_bias"):
                value = getattr(module, attr, None)
                if isinstance(value, Tensor):
                    value.zero_()
                    zeroed.append(f"{name}.{attr}" if name else attr)
            if getattr(module, "controller_w2", None) is not None:  # the adaptation's gain
                module.controller_w2.zero_()
                module.controller_b2.zero_()
                if getattr(module, "controller_drift_w", None) is not None:
                    module.controller_drift_w.zero_()
                    module.controller_drift_b.zero_()
                zeroed.append(f"{name}.controller" if name else "controller")
            if isinstance(module, ScheduledRule):
                last = module.schedule[-1]
                last.weight.zero_()
                last.bias.zero_()
                zeroed.append(f"{name}.schedule" if name else "schedule")
    if not zeroed:
        raise ValueError(f"The {type(rule).__name__} has no learned read-out to zero")
    return out


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
