r"""Persistent evolution strategies (and antithetic truncated ES): meta-gradients without
backpropagation through the unroll.

Vicol, Metz & Sohl-Dickstein, ICML 2021, "Unbiased gradient estimation in unrolled computation
graphs with persistent evolution strategies". Every particle runs under ``torch.no_grad`` with
theta perturbed in place, so memory does not grow with K or T and the estimate is unbiased for the
gradient of the Gaussian-smoothed meta-objective of the *whole* unroll (TBPTT is biased towards
short-horizon behaviour). ``persistent=False`` gives plain antithetic truncated ES, for
comparison.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ...learners import MetaLearner
from ...tasks import Batch, Task
from ..unroll import UnrollSpec, end_batch, tell_horizon
from .base import Estimator, MetaGradient, meta_parameters

__all__ = ["PESEstimator", "PESUnroll"]


@contextmanager
def _perturbed(params: Sequence[nn.Parameter], vector: Tensor) -> Iterator[None]:
    """Temporarily set the parameters' values to the flat ``vector`` (restored exactly)."""
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            offset = 0
            for p in params:
                n = p.numel()
                p.copy_(vector[offset : offset + n].view_as(p))
                offset += n
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def _flat(params: Sequence[nn.Parameter]) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _split(vector: Tensor, params: Sequence[nn.Parameter]) -> list[Tensor | None]:
    out: list[Tensor | None] = []
    offset = 0
    for p in params:
        out.append(vector[offset : offset + p.numel()].view_as(p).clone())
        offset += p.numel()
    return out


class PESUnroll:
    """The stream of :class:`PESEstimator` on one task (an iterator of :class:`MetaGradient`).

    Holds ``2 * pairs`` inner states (particle ``2i`` runs with theta + eps_i, particle ``2i+1``
    with theta - eps_i, fresh eps per window) and, per pair, the accumulated perturbation
    ``xi[i]`` (the sum of the eps_i of the windows since the pair's unroll started). At the end
    of the unroll (``horizon`` reached) the states are released and ``xi`` is reset to zero.

    Every particle of a window reads the same pre-drawn training batches (and held-out batch),
    common random numbers that cancel the data noise in ``L+ - L-``. A pair whose loss becomes
    non-finite or exceeds ``max_loss_ratio`` times its first loss is left out of that window's
    estimate and restarts from the task's initial state with ``xi = 0``.
    """

    def __init__(
        self,
        estimator: PESEstimator,
        learner: MetaLearner,
        task: Task,
        generator: torch.Generator,
        spec: UnrollSpec,
    ) -> None:
        self.log_meta_loss = spec.log_meta_loss
        self.estimator = estimator
        self.learner, self.task = learner, task
        self.horizon, self.truncation = spec.horizon, spec.truncation
        self.told = spec.told
        self.objective = spec.objective
        self.max_loss_ratio = spec.max_loss_ratio
        self.meta_loss_floor = spec.meta_loss_floor
        #: The unroll's first training loss (the same for every particle: the same start and
        #: batch), which ``meta_loss_floor`` scales.
        self.task_first_loss: float | None = None
        self.params = meta_parameters(learner)
        if not self.params:
            raise ValueError("The learner has no meta-parameters to estimate a gradient for")
        # Every particle starts from the inner state that unroll() would draw from `generator`
        # (the same phi_0 as TBPTT); the noise comes from the generator's next draw.
        self.init_rng = generator.get_state()
        with torch.no_grad():
            learner.init_state(task, generator)
        noise_seed = int(torch.randint(2**62, (1,), generator=generator))
        self.noise = torch.Generator().manual_seed(noise_seed)
        ref = self.params[0]
        self.numel = sum(p.numel() for p in self.params)
        pairs = estimator.pairs
        self.xi = torch.zeros(pairs, self.numel, dtype=ref.dtype, device=ref.device)
        self.states: list[Any] = [None] * (2 * pairs)
        self.first_loss: list[float | None] = [None] * pairs
        self.central: Any = None  # the unperturbed state (truncated ES only)
        self.position = 0

    def __iter__(self) -> PESUnroll:
        return self

    def _init_state(self) -> Any:
        gen = torch.Generator()
        gen.set_state(self.init_rng)
        with torch.no_grad():
            return tell_horizon(self.learner.init_state(self.task, gen), self.horizon, self.told)

    def _run(
        self, theta: Tensor, state: Any, batches: list[Batch], test_batch: Batch | None, pair: int
    ) -> tuple[Any, float, list[float], bool]:
        """K inner steps from ``state`` with the meta-parameters set to ``theta``, no graph.

        Returns ``(state, meta_loss, train_losses, diverged)``."""
        with _perturbed(self.params, theta), torch.no_grad():
            if state is None:
                state = self._init_state()
            losses: list[float] = []
            for batch in batches:
                state, loss = self.learner.step(self.task, state, batch, differentiable=False)
                value = float(loss)
                if self.task_first_loss is None:
                    self.task_first_loss = value
                if pair >= 0 and self.first_loss[pair] is None:
                    self.first_loss[pair] = value
                ref = self.first_loss[pair] if pair >= 0 else None
                if not math.isfinite(value) or (
                    self.max_loss_ratio is not None
                    and ref is not None
                    and value > self.max_loss_ratio * max(ref, 1e-12)
                ):
                    return state, math.nan, losses, True
                losses.append(value)
            if self.objective == "train":
                meta = sum(losses) / len(losses)
            else:
                assert test_batch is not None
                meta = float(self.learner.evaluate(self.task, state, test_batch))
            if self.log_meta_loss:
                if self.meta_loss_floor and self.task_first_loss is not None:
                    meta = meta + self.meta_loss_floor * self.task_first_loss
                meta = math.log(meta) if meta > 0 else math.nan
        return state, meta, losses, not math.isfinite(meta)

    def __next__(self) -> MetaGradient:
        if self.position >= self.horizon:
            raise StopIteration
        est = self.estimator
        start, end = self.position, min(self.position + self.truncation, self.horizon)
        batches = [self.task.train.sample() for _ in range(end - start)]
        test_batch = end_batch(self.task, self.objective)  # after the window's, as unroll does
        theta = _flat(self.params)
        eps = est.sigma * torch.randn(self.xi.shape, generator=self.noise, dtype=torch.float64).to(
            self.xi
        )
        if est.persistent:
            self.xi = self.xi + eps
        else:
            self.xi = eps
        total = torch.zeros_like(theta)
        used, diverged_pairs, pair_losses, curves = 0, 0, [], []
        for i in range(est.pairs):
            if not est.persistent:  # truncated ES: every window starts from the central state
                self.states[2 * i] = self.states[2 * i + 1] = self.central
            plus = self._run(theta + eps[i], self.states[2 * i], batches, test_batch, i)
            minus = self._run(theta - eps[i], self.states[2 * i + 1], batches, test_batch, i)
            if plus[3] or minus[3]:  # restart the pair from the beginning
                diverged_pairs += 1
                self.states[2 * i] = self.states[2 * i + 1] = None
                self.xi[i].zero_()
                self.first_loss[i] = None
                continue
            self.states[2 * i], self.states[2 * i + 1] = plus[0], minus[0]
            total += self.xi[i] * ((plus[1] - minus[1]) / (2 * est.sigma**2))
            used += 1
            pair_losses.append(0.5 * (plus[1] + minus[1]))
            curves.append([0.5 * (a + b) for a, b in zip(plus[2], minus[2])])
        meta_loss = sum(pair_losses) / used if used else math.nan
        if not est.persistent:
            self.central, central_loss, _, bad = self._run(
                theta, self.central, batches, test_batch, -1
            )
            if not bad:
                meta_loss = central_loss
        grads = _split(total / used, self.params) if used else None
        train_losses = (
            torch.tensor(curves, dtype=torch.float64).mean(0) if curves else torch.zeros(0)
        )
        all_diverged = used == 0
        self.position = self.horizon if all_diverged else end
        if self.position >= self.horizon:  # the unroll is over: release it, reset the xi
            self.states = [None] * (2 * est.pairs)
            self.first_loss = [None] * est.pairs
            self.central = None
            self.xi = torch.zeros_like(self.xi)
        return MetaGradient(
            grads,
            float(meta_loss),
            train_losses.to(torch.float32),
            start,
            end,
            all_diverged,
            {"pairs_used": used, "pairs_diverged": diverged_pairs},
        )


class PESEstimator(Estimator):
    r"""Persistent evolution strategies (Vicol, Metz & Sohl-Dickstein, ICML 2021).

    For each of ``pairs`` antithetic particle pairs and each truncation window w, draw
    :math:`\epsilon_{i,w} \sim \mathcal N(0, \sigma^2 I)` over all meta-parameters, run the
    window from the pair's own persistent states with :math:`\theta \pm \epsilon_{i,w}`, and
    accumulate :math:`\xi_i \mathrel{+}= \epsilon_{i,w}`. The window's estimate is

    .. math::
        \hat g_w = \frac{1}{N} \sum_i \xi_i \,
            \frac{L_w(\theta + \epsilon_{i,\cdot}) - L_w(\theta - \epsilon_{i,\cdot})}{2\sigma^2},

    whose sum over windows is unbiased for the gradient of the Gaussian-smoothed total
    meta-objective of the whole unroll, whatever the truncation, because :math:`\xi_i` carries the
    perturbations of the earlier windows that the current states depend on. With
    ``persistent=False``, :math:`\xi_i = \epsilon_{i,w}` and every window's particles start from
    an unperturbed central state: antithetic truncated ES, biased like TBPTT.

    No graph is ever built (``torch.no_grad``, the learner's ``step(differentiable=False)``), so
    the memory is ``2 * pairs`` inner states, independent of K and T; the cost is ``2 * pairs``
    forward unrolls per window. The window meta-losses are those of
    :func:`~learned_opt.outer.unroll.unroll` (``"train"``: the mean training loss of the window;
    ``"test"``: the held-out loss at its end).

    The variance of the estimate grows with the number d of meta-parameters (each pair
    estimates one random directional derivative): with thousands of weights, use many pairs
    (and tasks) per meta-step, or clip. The perturbation's norm is about ``sigma * sqrt(d)``.

    Args:
        sigma: standard deviation of the perturbations (in the units of theta).
        pairs: antithetic pairs N (2N particles).
        persistent: accumulate the perturbations across windows (PES); ``False``: truncated ES.
    """

    name = "pes"

    def __init__(self, sigma: float = 0.01, pairs: int = 8, persistent: bool = True) -> None:
        if sigma <= 0 or pairs < 1:
            raise ValueError(f"Invalid sigma/pairs: {sigma}/{pairs}")
        self.sigma = float(sigma)
        self.pairs = int(pairs)
        self.persistent = bool(persistent)

    def unroll(
        self,
        learner: MetaLearner,
        task: Task,
        generator: torch.Generator,
        spec: UnrollSpec,
        *,
        reference: MetaLearner | None = None,
    ) -> PESUnroll:
        if reference is not None:
            raise ValueError(
                f"The {self.name!r} estimator does not support a reference learner (the "
                "loss-averse objective): use 'tbptt'"
            )
        return PESUnroll(self, learner, task, generator, spec)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sigma": self.sigma,
            "pairs": self.pairs,
            "persistent": self.persistent,
        }
