"""Mixtures of task families, the diverse meta-training distribution, and random horizons.

A learned optimizer generalizes to what its meta-training distribution covers.
:class:`DiverseFamily` is the distribution the default weights were meta-trained on: MLPs of
drawn width, depth and activation on MNIST and on scikit-learn's digits, small conv nets on
MNIST, an Elman RNN reading MNIST row by row, and least-squares MLPs on scikit-learn's diabetes
table. The out-of-distribution benchmark
(``benchmarks/ood.py``) evaluates on tasks outside it.

Random horizons: meta-training on one fixed horizon T teaches a rule to be good *at step T*
(e.g. to anneal just before it); :func:`sample_horizon` draws a heavy-tailed horizon per task
instead; the meta-trainer draws each task's horizon with it when ``MetaTrainConfig.min_horizon``
is set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .base import Task, TaskFamily
from .rescale import RescaledFamily
from .zoo import ConvFamily, RandomMLPFamily, RowRNNFamily

__all__ = ["DiverseFamily", "MixtureFamily", "ValidationOODFamily", "sample_horizon"]


def sample_horizon(generator: torch.Generator, min_steps: int = 50, max_steps: int = 1000) -> int:
    r"""A log-uniform integer horizon in ``[min_steps, max_steps]``.

    :math:`T = \lfloor \exp(U) \rfloor` with :math:`U \sim \mathcal{U}[\log T_{min},
    \log (T_{max} + 1)]`: density :math:`\propto 1/T`, so every octave of horizons gets the same
    share of tasks (with the defaults, about as many tasks run 50-100 steps as 500-1000), and the
    long unrolls that teach late-training behaviour are not drowned out by short ones, nor do they
    dominate the compute.

    How :class:`~learned_opt.outer.MetaTrainer` uses it (``MetaTrainConfig.min_horizon``):
    the horizon of task ``j`` of iteration ``i`` comes from its own stream,
    ``sample_horizon(torch.Generator().manual_seed(task_seed(seed, i, j) + 2), ...)``, and the
    iteration runs ``ceil(max_j T_j / K)`` rounds of windows: tasks that end early drop out of the
    later rounds. Per-window meta-losses are means over the
    window, so short and long tasks weigh alike per window.
    """
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"Invalid horizon range: [{min_steps}, {max_steps}]")
    lo, hi = math.log(min_steps), math.log(max_steps + 1)
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    return min(max_steps, max(min_steps, int(math.exp(lo + u * (hi - lo)))))


class MixtureFamily(TaskFamily):
    """Each task comes from one member family, drawn with probabilities ``weights``.

    The member index and then the member's task are drawn from the same generator, so the
    mixture is as deterministic as its members.

    Args:
        members: the task families.
        weights: relative probabilities (``None``: uniform).
        name: the mixture's name (in logs and checkpoints).
    """

    def __init__(
        self,
        members: Sequence[TaskFamily],
        weights: Sequence[float] | None = None,
        name: str = "mixture",
    ) -> None:
        self.members = list(members)
        if not self.members:
            raise ValueError("A mixture needs at least one member family")
        w = [1.0] * len(self.members) if weights is None else [float(x) for x in weights]
        if len(w) != len(self.members) or not all(0 <= x < math.inf for x in w) or sum(w) <= 0:
            raise ValueError(f"Invalid weights {w} for {len(self.members)} members")
        self.weights = w
        self.name = name
        self._probs = torch.tensor(w, dtype=torch.float64) / sum(w)

    def sample_member(self, generator: torch.Generator) -> int:
        """Index of the member family of the next task (consumes one draw)."""
        return int(torch.multinomial(self._probs, 1, generator=generator))

    def sample(self, generator: torch.Generator) -> Task:
        return self.members[self.sample_member(generator)].sample(generator)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weights": list(self.weights),
            "members": [m.config() for m in self.members],
        }


class DiverseFamily(MixtureFamily):
    """The diverse meta-training distribution of the default weights (registered as ``"diverse"``).

    Members (relative weight):

    - (3) MLPs on MNIST: width 16/32/64, 1-2 hidden layers, sigmoid/tanh/ReLU/GELU, batch
      32/64/128;
    - (2) MLPs on digits: width 16/32/64, 1-3 hidden layers, the four activations, batch
      16/32/64;
    - (1) conv nets on MNIST: 4/8 channels, 2-3 stride-2 convolutions, batch 32/64;
    - (1) Elman RNNs reading MNIST rows (28 steps of 28 pixels): 16/32 units, batch 32/64;
    - (1) least-squares regression on diabetes: linear or 1-2 hidden layers of 16/32, the four
      activations, batch 16/32/64.

    Args:
        holdout: ``"val"`` (meta-training) or ``"test"``.
        param_scale_range, loss_scale_range: if either is given, every member is wrapped in a
            :class:`~learned_opt.tasks.rescale.RescaledFamily` with these ranges (the other one
            defaulting to ``(1, 1)``).
    """

    def __init__(
        self,
        holdout: str = "val",
        param_scale_range: Sequence[float] | None = None,
        loss_scale_range: Sequence[float] | None = None,
    ) -> None:
        acts = ("sigmoid", "tanh", "relu", "gelu")
        members: list[TaskFamily] = [
            RandomMLPFamily("mnist", (16, 32, 64), (1, 2), acts, (32, 64, 128), holdout=holdout),
            RandomMLPFamily("digits", (16, 32, 64), (1, 2, 3), acts, (16, 32, 64), holdout=holdout),
            ConvFamily("mnist", (4, 8), (2, 3), (32, 64), holdout=holdout),
            RowRNNFamily("mnist", ("rnn",), (16, 32), (32, 64), holdout=holdout),
            RandomMLPFamily(
                "diabetes", (16, 32), (0, 1, 2), acts, (16, 32, 64), None, holdout=holdout
            ),
        ]
        self.holdout = holdout
        self.param_scale_range = None if param_scale_range is None else tuple(param_scale_range)
        self.loss_scale_range = None if loss_scale_range is None else tuple(loss_scale_range)
        if self.param_scale_range is not None or self.loss_scale_range is not None:
            members = [
                RescaledFamily(
                    m, self.param_scale_range or (1.0, 1.0), self.loss_scale_range or (1.0, 1.0)
                )
                for m in members
            ]
        super().__init__(members, (3, 2, 1, 1, 1), name="diverse")


class ValidationOODFamily(MixtureFamily):
    """Validation tasks outside the meta-training distribution (registered as ``"val-ood"``),
    for selecting weights that transfer (``MetaTrainConfig.eval_family``).

    Weights selected on held-out tasks of the meta-training distribution itself keep improving
    there while they get worse out of distribution, so selection needs tasks
    that are shifted the way the out-of-distribution benchmark is, yet are not its tasks. Each
    member is outside :class:`DiverseFamily` and differs from every task of ``benchmarks/ood.py``
    (equal weights):

    - MLPs on iris (a dataset in neither): width 16/32, 1-2 hidden layers, the four activations,
      batch 16/32;
    - MLPs on digits wider than any of ``diverse`` (2 x 128, tanh/GELU, batch 128);
    - conv nets on MNIST with more channels than ``diverse``'s (16 channels, 2 layers, batch 64);
    - Elman RNNs on MNIST rows wider than ``diverse``'s (64 units, batch 128).

    Args:
        holdout: ``"val"`` (weight selection; the default) or ``"test"``.
    """

    def __init__(self, holdout: str = "val") -> None:
        acts = ("sigmoid", "tanh", "relu", "gelu")
        members: list[TaskFamily] = [
            RandomMLPFamily("iris", (16, 32), (1, 2), acts, (16, 32), None, holdout=holdout),
            RandomMLPFamily("digits", (128,), (2,), ("tanh", "gelu"), (128,), holdout=holdout),
            ConvFamily("mnist", (16,), (2,), (64,), holdout=holdout),
            RowRNNFamily("mnist", ("rnn",), (64,), (128,), holdout=holdout),
        ]
        self.holdout = holdout
        super().__init__(members, name="val-ood")
