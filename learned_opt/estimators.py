r"""Meta-gradient estimators behind one interface: truncated backpropagation and (persistent)
evolution strategies.

Meta-training unrolls a task for T inner steps in truncation windows of K steps and takes one
meta-step per window. An :class:`Estimator` turns one task's unroll into a stream of per-window
meta-gradient estimates, :class:`MetaGradient` (one gradient tensor per meta-parameter, in
``learner.parameters()`` order). The stream is lazy: window w+1 is computed only when asked for,
*after* the consumer has taken its meta-step, so it runs with the updated theta, exactly like
:func:`~learned_opt.unroll.unroll`'s windows in :class:`~learned_opt.meta_train.MetaTrainer`.

- :class:`TBPTTEstimator`: backpropagation through each window (truncated backpropagation
  through time), the trainer's default (``MetaTrainConfig(estimator="tbptt")``).
- :class:`PESEstimator`: persistent evolution strategies (Vicol, Metz & Sohl-Dickstein, ICML 2021,
  "Unbiased gradient estimation in unrolled computation graphs with persistent evolution
  strategies"). No backpropagation through the unroll at all: every particle runs under
  ``torch.no_grad`` with theta perturbed in place, so memory does not grow with K or T and the
  estimate is unbiased for the gradient of the Gaussian-smoothed meta-objective of the *whole*
  unroll (TBPTT is biased towards short-horizon behaviour). ``persistent=False`` gives plain
  antithetic truncated ES, for comparison.

How :class:`~learned_opt.meta_train.MetaTrainer` drives an estimator (``train_iteration``; with
distribution and rollback on top) and, for a single process without the trainer,
:func:`meta_train_iteration`::

    streams = [est.unroll(learner, task_j, gen_j, horizon=T, truncation=K, objective=...)
               for j in tasks of the iteration]
    for each round of windows:
        estimates = [next(s) for s in streams (dropping exhausted ones)]
        grads = average_gradients(estimates)          # mean over tasks, like the mean meta-loss
        meta_opt.zero_grad(); set_gradients(learner, grads); clip; meta_opt.step()
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .learners import MetaLearner
from .tasks import Batch, Task
from .unroll import OBJECTIVES, unroll

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "MetaGradient",
    "PESEstimator",
    "PESUnroll",
    "TBPTTEstimator",
    "average_gradients",
    "build_estimator",
    "meta_parameters",
    "meta_train_iteration",
    "set_gradients",
]


@dataclass
class MetaGradient:
    """One truncation window's meta-gradient estimate.

    Attributes:
        grads: one tensor (or ``None``: no dependence) per meta-parameter, in the order of
            :func:`meta_parameters`; ``None`` as a whole when the window is unusable (the task
            diverged before any step).
        meta_loss: the window's meta-loss at theta (PES: the mean over the antithetic particles).
        train_losses: the inner training loss of each step of the window (detached; PES: the
            particles' mean).
        start, end: inner steps covered, ``[start, end)``.
        diverged: the unroll stops after this window (the inner loss became non-finite or
            exploded).
        info: estimator-specific diagnostics (plain numbers).
    """

    grads: list[Tensor | None] | None
    meta_loss: float
    train_losses: Tensor
    start: int
    end: int
    diverged: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def meta_parameters(learner: nn.Module) -> list[nn.Parameter]:
    """The meta-parameters theta: the learner's parameters that require grad, in order."""
    return [p for p in learner.parameters() if p.requires_grad]


def average_gradients(estimates: Sequence[MetaGradient]) -> list[Tensor | None] | None:
    """The mean of the usable estimates' gradients (what backpropagating the mean of their
    meta-losses gives): per parameter, ``None`` counts as zero unless every estimate has
    ``None``. ``None`` when no estimate is usable."""
    usable = [e.grads for e in estimates if e.grads is not None]
    if not usable:
        return None
    out: list[Tensor | None] = []
    for per_param in zip(*usable):
        present = [g for g in per_param if g is not None]
        out.append(torch.stack(present).sum(0) / len(usable) if present else None)
    return out


def set_gradients(learner: nn.Module, grads: Sequence[Tensor | None]) -> None:
    """Write ``grads`` into ``p.grad`` of :func:`meta_parameters` (``None`` leaves no grad)."""
    params = meta_parameters(learner)
    if len(grads) != len(params):
        raise ValueError(f"{len(grads)} gradients for {len(params)} meta-parameters")
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.detach().to(p.dtype).clone()


class Estimator:
    """A meta-gradient estimator: turns a task's unroll into per-window gradient estimates.

    Subclasses implement :meth:`unroll` and :meth:`config`.
    """

    #: Name under which :func:`build_estimator` finds the class.
    name: str = ""

    def unroll(
        self,
        learner: MetaLearner,
        task: Task,
        generator: torch.Generator,
        *,
        horizon: int,
        truncation: int,
        objective: str = "train",
        max_loss_ratio: float | None = None,
        log_meta_loss: bool = False,
        reference: MetaLearner | None = None,
        loss_aversion: float = 0.0,
    ) -> Iterator[MetaGradient]:
        """A lazy stream of one :class:`MetaGradient` per truncation window of ``task``.

        Arguments as for :func:`~learned_opt.unroll.unroll`; ``generator`` draws the inner
        state (and, for stochastic estimators, their noise). Each window is computed with the
        meta-parameters as they are when it is requested. ``reference``/``loss_aversion`` (the
        loss-averse objective relative to a reference learner) are supported by
        :class:`TBPTTEstimator` only.
        """
        raise NotImplementedError

    def meta_gradient(
        self,
        learner: MetaLearner,
        task: Task,
        generator: torch.Generator,
        *,
        horizon: int,
        truncation: int,
        objective: str = "train",
        max_loss_ratio: float | None = None,
        log_meta_loss: bool = False,
        reference: MetaLearner | None = None,
        loss_aversion: float = 0.0,
    ) -> MetaGradient:
        """The estimate for the whole unroll at fixed theta: the mean over usable windows of
        the window estimates, i.e. of the gradient of the mean window meta-loss (TBPTT: the
        truncated gradient; PES: unbiased for the full one)."""
        windows = list(
            self.unroll(
                learner,
                task,
                generator,
                horizon=horizon,
                truncation=truncation,
                objective=objective,
                max_loss_ratio=max_loss_ratio,
                log_meta_loss=log_meta_loss,
                reference=reference,
                loss_aversion=loss_aversion,
            )
        )
        usable = [w for w in windows if w.grads is not None]
        losses = [w.train_losses for w in windows]
        return MetaGradient(
            average_gradients(windows),
            float(sum(w.meta_loss for w in usable) / len(usable)) if usable else math.nan,
            torch.cat(losses) if losses else torch.zeros(0),
            windows[0].start if windows else 0,
            windows[-1].end if windows else 0,
            any(w.diverged for w in windows),
            {"windows": len(windows), "usable_windows": len(usable)},
        )

    def config(self) -> dict[str, Any]:
        """JSON-serializable constructor arguments."""
        raise NotImplementedError


def _check(horizon: int, truncation: int, objective: str) -> None:
    if horizon < 1 or truncation < 1:
        raise ValueError(f"Invalid horizon/truncation: {horizon}/{truncation}")
    if objective not in OBJECTIVES:
        raise ValueError(f"Invalid objective {objective!r}; expected one of {OBJECTIVES}")


class TBPTTEstimator(Estimator):
    """Truncated backpropagation through time: each window's meta-loss is backpropagated through
    the window's inner steps (the state is detached between windows). This is what
    :class:`~learned_opt.meta_train.MetaTrainer` does; first or second order is the learner's
    choice (``OptimizerLearner(second_order=...)``).

    Args:
        checkpoint_segment: gradient checkpointing of the window, passed to
            :func:`~learned_opt.unroll.unroll` as it is (which validates it; e.g.
            ``MetaTrainConfig.checkpoint_segment()``); ``None``: off.
    """

    name = "tbptt"

    def __init__(self, checkpoint_segment: Any = None) -> None:
        self.checkpoint_segment = checkpoint_segment

    def unroll(
        self,
        learner: MetaLearner,
        task: Task,
        generator: torch.Generator,
        *,
        horizon: int,
        truncation: int,
        objective: str = "train",
        max_loss_ratio: float | None = None,
        log_meta_loss: bool = False,
        reference: MetaLearner | None = None,
        loss_aversion: float = 0.0,
    ) -> Iterator[MetaGradient]:
        _check(horizon, truncation, objective)
        params = meta_parameters(learner)
        for w in unroll(
            learner,
            task,
            generator,
            horizon=horizon,
            truncation=truncation,
            objective=objective,
            max_loss_ratio=max_loss_ratio,
            checkpoint_segment=self.checkpoint_segment,
            log_meta_loss=log_meta_loss,
            reference=reference,
            loss_aversion=loss_aversion,
        ):
            grads: list[Tensor | None] | None = None
            loss = math.nan
            if w.meta_loss is not None:
                loss = float(w.meta_loss.detach())
                if w.meta_loss.requires_grad:
                    grads = list(torch.autograd.grad(w.meta_loss, params, allow_unused=True))
                else:
                    grads = [None] * len(params)
            yield MetaGradient(grads, loss, w.train_losses, w.start, w.end, w.diverged)

    def config(self) -> dict[str, Any]:
        segment = self.checkpoint_segment
        if isinstance(segment, tuple):
            segment = list(segment)
        return {"name": self.name, "checkpoint_segment": segment}


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
        *,
        horizon: int,
        truncation: int,
        objective: str,
        max_loss_ratio: float | None,
        log_meta_loss: bool = False,
    ) -> None:
        _check(horizon, truncation, objective)
        self.log_meta_loss = log_meta_loss
        self.estimator = estimator
        self.learner, self.task = learner, task
        self.horizon, self.truncation, self.objective = horizon, truncation, objective
        self.max_loss_ratio = max_loss_ratio
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
            return self.learner.init_state(self.task, gen)

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
                meta = math.log(meta) if meta > 0 else math.nan
        return state, meta, losses, not math.isfinite(meta)

    def __next__(self) -> MetaGradient:
        if self.position >= self.horizon:
            raise StopIteration
        est = self.estimator
        start, end = self.position, min(self.position + self.truncation, self.horizon)
        batches = [self.task.train.sample() for _ in range(end - start)]
        test_batch = self.task.test.sample() if self.objective == "test" else None
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
    :func:`~learned_opt.unroll.unroll` (``"train"``: the mean training loss of the window;
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
        *,
        horizon: int,
        truncation: int,
        objective: str = "train",
        max_loss_ratio: float | None = None,
        log_meta_loss: bool = False,
        reference: MetaLearner | None = None,
        loss_aversion: float = 0.0,
    ) -> PESUnroll:
        if reference is not None:
            raise ValueError(
                f"The {self.name!r} estimator does not support a reference learner (the "
                "loss-averse objective): use 'tbptt'"
            )
        return PESUnroll(
            self,
            learner,
            task,
            generator,
            horizon=horizon,
            truncation=truncation,
            objective=objective,
            max_loss_ratio=max_loss_ratio,
            log_meta_loss=log_meta_loss,
        )

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sigma": self.sigma,
            "pairs": self.pairs,
            "persistent": self.persistent,
        }


#: Estimators by name: ``"es"`` is :class:`PESEstimator` with ``persistent=False``.
ESTIMATORS: dict[str, tuple[type[Estimator], dict[str, Any]]] = {
    "tbptt": (TBPTTEstimator, {}),
    "pes": (PESEstimator, {}),
    "es": (PESEstimator, {"persistent": False}),
}


def build_estimator(name: str, **kwargs: Any) -> Estimator:
    """An estimator by name (:data:`ESTIMATORS`) with keyword overrides of its defaults."""
    if name not in ESTIMATORS:
        raise ValueError(f"Unknown estimator {name!r}; expected one of {sorted(ESTIMATORS)}")
    cls, defaults = ESTIMATORS[name]
    return cls(**{**defaults, **kwargs})


def meta_train_iteration(
    learner: MetaLearner,
    meta_opt: torch.optim.Optimizer,
    streams: Sequence[Iterator[MetaGradient]],
    *,
    clip_grad: float = 1.0,
) -> dict[str, float]:
    """One meta-training iteration driven by estimator streams (one per task).

    Round after round, takes the next window of every stream still running, averages their
    gradients (:func:`average_gradients`), clips the norm to ``clip_grad`` (``0``: no clipping)
    and takes one meta-step; a round whose gradient or mean meta-loss is not finite is skipped.
    The loop of ``MetaTrainer.train_iteration`` without the trainer (single process; no
    rollback, logging or checkpoints), for research code that builds its own streams: with the
    trainer's streams it takes the same steps (tested).

    Returns:
        ``{"meta_loss", "grad_norm", "skipped", "rounds"}`` (means over the rounds).
    """
    active = list(streams)
    losses, norms, skipped, rounds = [], [], 0, 0
    max_norm = clip_grad if clip_grad > 0 else math.inf
    while active:
        estimates = []
        for s in list(active):
            e = next(s, None)
            if e is None:
                active.remove(s)
                continue
            estimates.append(e)
        grads = average_gradients(estimates)
        if grads is None:
            continue
        rounds += 1
        usable = [e.meta_loss for e in estimates if e.grads is not None]
        meta_loss = sum(usable) / len(usable)
        meta_opt.zero_grad(set_to_none=True)
        set_gradients(learner, grads)
        params = [p for p in meta_parameters(learner) if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        losses.append(meta_loss)
        norms.append(norm)
        if not (math.isfinite(norm) and math.isfinite(meta_loss)):
            meta_opt.zero_grad(set_to_none=True)
            skipped += 1
            continue
        meta_opt.step()
    return {
        "meta_loss": sum(losses) / len(losses) if losses else math.nan,
        "grad_norm": sum(norms) / len(norms) if norms else math.nan,
        "skipped": float(skipped),
        "rounds": float(rounds),
    }
