"""The inner loop, unrolled in truncation windows. Returns meta-losses; does no I/O.

Gradient checkpointing (``unroll(..., checkpoint_segment=...)``) trades recomputation for memory
in the meta-backward of a window of K inner steps. The forward pass runs the K steps once and
keeps only some inner states ("checkpoints"); when the meta-gradient reaches a step whose saved
activations were dropped, the steps are re-run from the nearest checkpoint before it.

- ``checkpoint_segment=S`` (one level): a checkpoint every S steps, and the activations of one
  segment of S steps at a time; each step runs twice (forward + one recomputation). Memory
  ~ K / S states + S steps of activations, i.e. ~sqrt(K) with ``S = ceil(sqrt(K))``.
- ``checkpoint_segment=(S1, S2, ..., SL)`` (segments of segments, S1 > S2 > ... > SL): the
  forward pass keeps a checkpoint every S1 steps. When the backward reaches a level-1 segment,
  it re-runs it from its start and keeps a checkpoint every S2 steps inside it; when it reaches
  one of those level-2 segments, it re-runs that one keeping a checkpoint every S3 steps, and
  so on; the activations of one level-L segment (SL steps) are alive at a time. Each level
  re-runs the steps once more: a step runs at most L + 1 times. Alive at any time: at most
  ``ceil(K / S1) + (ceil(S1 / S2) - 1) + ... + (ceil(S(L-1) / SL) - 1)`` checkpoints and SL
  steps of activations. :func:`checkpoint_schedule` (the trainer's default) uses
  ``(q^(L-1), ..., q, 1)`` with ``L = ceil(log_8 K)`` levels and ``q = ceil(K^(1/L))``: e.g.
  ``(1,)`` for K <= 8, ``(5, 1)`` for K = 20, ``(25, 5, 1)`` for K = 100, i.e. O(log K)
  states and one step's activations, for ~L extra forward passes of the inner steps
  (:func:`schedule_cost` counts them exactly).

The training batches are drawn in the forward pass as in the plain unroll (the sampler's stream
is the same) and, for a :class:`~learned_opt.tasks.BatchSampler`, redrawn when a step is re-run
(its generator is rewound, then restored), so they take no memory across the window; other
samplers' batches are kept. The random-number state of each step is replayed too, so the
re-run steps compute exactly the same values and the meta-gradients are those of the plain
unroll, bit for bit.

Why not ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: a learner's ``step``
calls ``torch.autograd.grad`` on the inner loss *inside* the segment, and that checkpoint treats
every such call as a backward pass that needs the segment's activations, so it recomputes the
segment's prefix at every inner step (quadratic cost) and, in PyTorch 2.13, returns wrong
meta-gradients for :class:`~learned_opt.learners.OptimizerLearner`. :class:`_CheckpointedWindow`
below is the same non-reentrant scheme (``saved_tensors_hooks``), with the saved tensors of each
step kept while that step's own forward runs and dropped when it ends.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .learners import MetaLearner
from .tasks import Batch, BatchSampler, Task

__all__ = [
    "OBJECTIVES",
    "Window",
    "unroll",
    "run_inner",
    "sqrt_segment",
    "checkpoint_schedule",
    "checkpoint_segments",
    "schedule_cost",
]

#: Meta-objectives: "train" = mean training loss over the window (the paper's sum of losses,
#: scaled by 1/K); "test" = held-out loss at the end of the window.
OBJECTIVES = ("train", "test")


@dataclass
class Window:
    """One truncation window of an unroll.

    Attributes:
        meta_loss: the window's meta-loss (differentiable in theta when the unroll is), or
            ``None`` when the inner task diverged before any usable step.
        train_losses: the training loss of each inner step in the window (detached).
        start, end: inner steps covered, ``[start, end)``.
        state: the inner state at the end of the window (before detaching).
        diverged: the inner loss became non-finite or exploded; the unroll stops after this.
        reference_objective: with a ``reference`` learner, its objective on the window (same
            batches; ``None`` without one, or once the reference diverged).
    """

    meta_loss: Tensor | None
    train_losses: Tensor
    start: int
    end: int
    state: Any
    diverged: bool = False
    reference_objective: float | None = None


def sqrt_segment(truncation: int) -> int:
    """``ceil(sqrt(K))``: the one-level segment length that balances the boundary states kept
    (K / S of them) against the activations of the one segment recomputed at a time (S steps)."""
    return max(1, math.ceil(math.sqrt(truncation)))


def checkpoint_schedule(truncation: int, max_ratio: int = 8) -> tuple[int, ...]:
    """Multi-level segment lengths for a window of ``truncation`` (K) steps.

    ``L`` levels, the fewest with ``max_ratio ** L >= K``; ``q``, the smallest integer with
    ``q ** L >= K``; segments ``(q^(L-1), ..., q, 1)``. About ``L * (q - 1) + 1`` inner states
    and one step's activations are alive at a time, and each step runs at most ``L + 1`` times:
    ``(1,)`` for K <= 8, ``(3, 1)`` for K = 9, ``(5, 1)`` for K = 20, ``(8, 1)`` for K = 64,
    ``(25, 5, 1)`` for K = 100.
    """
    if truncation < 1 or max_ratio < 2:
        raise ValueError(f"Invalid truncation/max_ratio: {truncation}/{max_ratio}")
    levels = 1
    while max_ratio**levels < truncation:
        levels += 1
    q = 1
    while q**levels < truncation:
        q += 1
    return tuple(q**i for i in reversed(range(levels)))


def checkpoint_segments(checkpoint_segment: int | Sequence[int]) -> tuple[int, ...]:
    """``checkpoint_segment`` (``S`` or ``(S1, ..., SL)``) as a tuple of levels, validated."""
    if isinstance(checkpoint_segment, int):
        sizes: tuple[int, ...] = (checkpoint_segment,)
    elif isinstance(checkpoint_segment, Sequence) and not isinstance(checkpoint_segment, str):
        sizes = tuple(checkpoint_segment)
    else:
        sizes = ()
    if (
        not sizes
        or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes)
        or any(a <= b for a, b in zip(sizes, sizes[1:]))
    ):
        raise ValueError(
            f"Invalid checkpoint_segment: {checkpoint_segment} (must be >= 1, or segment lengths "
            "S1 > S2 > ... >= 1 of nested levels)"
        )
    return sizes


def _plan(j: int, a: int, sizes: tuple[int, ...]) -> tuple[list[int], int]:
    """What to do when the backward needs step ``j`` and the nearest checkpoint is at ``a <= j``.

    The level-m segments of a window are those of length ``sizes[m]`` that tile the level-(m-1)
    segment (the whole window for m = 0) from its start. Re-running the steps ``a .. j`` keeps a
    checkpoint at every segment start inside the segments that contain ``j`` (a level-m start
    inside j's level-(m-1) segment) after ``a``, and keeps the activations of the steps of
    ``j``'s innermost segment. Returns ``(checkpoint positions, first step to keep)``.
    """
    store: set[int] = set()
    block = 0  # start of the segment of the level above that contains j
    for s in sizes:
        first = block + max(0, (a - block) // s + 1) * s  # first level-s start after a
        store.update(range(first, j + 1, s))
        block += ((j - block) // s) * s
    fill = max(a, block)
    return sorted(p for p in store if p < fill), fill


def schedule_cost(steps: int, checkpoint_segment: int | Sequence[int]) -> dict[str, int]:
    """Cost of checkpointing one window of ``steps`` inner steps, counted by running the schedule
    of :func:`unroll` (with the backward reaching the steps last to first, as PyTorch's engine
    does): ``recomputed`` steps (re-runs, on top of the ``steps`` of the forward pass),
    ``max_runs`` of one step (forward included), ``max_checkpoints`` (inner states kept at once,
    the window's start state included) and ``max_filled`` (steps whose activations are alive at
    once)."""
    sizes = checkpoint_segments(checkpoint_segment)
    states = set(range(0, steps, sizes[0]))
    filled: set[int] = set()
    runs = [1] * steps
    cost = {"recomputed": 0, "max_runs": 1, "max_checkpoints": len(states), "max_filled": 0}
    for j in reversed(range(steps)):
        if j in filled:
            continue
        states = {p for p in states if p <= j}
        a = max(states)
        store, fill = _plan(j, a, sizes)
        states.update(store)
        filled = set(range(fill, j + 1))
        for p in range(a, j + 1):
            runs[p] += 1
        cost["recomputed"] += j + 1 - a
        cost["max_checkpoints"] = max(cost["max_checkpoints"], len(states))
        cost["max_filled"] = max(cost["max_filled"], len(filled))
    cost["max_runs"] = max(runs, default=1)
    return cost


class _Holder:
    """One saved activation of an inner step; ``value`` is ``None`` while dropped."""

    __slots__ = ("value", "step", "shape", "dtype", "__weakref__")

    def __init__(self, value: Tensor, step: int) -> None:
        self.value: Tensor | None = value
        self.step = step
        self.shape = value.shape
        self.dtype = value.dtype


def _replayable(sampler: Any) -> bool:
    """Whether ``sampler.sample()`` is a function of its generator's state alone."""
    return (
        isinstance(sampler, BatchSampler)
        and type(sampler).sample is BatchSampler.sample
        and isinstance(sampler.generator, torch.Generator)
    )


class _CheckpointedWindow:
    """The inner steps of one window under (multi-level) gradient checkpointing.

    :meth:`step` runs the window's next inner step (forward pass) with ``saved_tensors_hooks``
    that route every tensor autograd saves through a :class:`_Holder`. The holders keep their
    tensors while the step runs (the learner's own ``torch.autograd.grad`` calls need them) and
    drop them when it returns; the inner state before every ``sizes[0]``-th step is kept as a
    checkpoint. When the meta-backward needs a dropped tensor of step ``j``, :meth:`_recompute`
    re-runs the steps from the nearest checkpoint before ``j`` to ``j`` (with the same batches
    and random-number state), keeping new checkpoints and refilling the holders of ``j``'s
    innermost segment as :func:`_plan` says, and frees the checkpoints and activations of the
    steps after ``j`` (the backward is past them). The learner's step must be deterministic.
    """

    def __init__(
        self, learner: MetaLearner, task: Task, sizes: tuple[int, ...], differentiable: bool
    ) -> None:
        self.learner, self.task, self.sizes = learner, task, sizes
        self.differentiable = differentiable
        self.holders: list[list[weakref.ref[_Holder]]] = []  # per step
        self.checkpoints: dict[int, Any] = {}  # step -> the inner state before it
        self.cpu_rng: list[Tensor] = []
        self.cuda_rng: list[list[Tensor] | None] = []
        self.sampler = task.train if _replayable(task.train) else None
        self.sampler_rng: list[Tensor] = []  # the sampler's state before each step's batch
        self.batches: list[Batch] = []  # the batches themselves, for other samplers
        self.filled: set[int] = set()  # steps whose holders were refilled by a re-run
        self.running: int | None = None  # the step whose forward pass is running
        self.forward_done = False
        self.recomputed = 0  # steps re-run
        self.last_batch: Batch | None = None  # the batch of the step run last (forward pass)

    def step(self, state: Any) -> tuple[Any, Tensor]:
        """Run the window's next inner step on ``state``: ``(new_state, loss)``."""
        i = len(self.holders)
        if i % self.sizes[0] == 0:
            self.checkpoints[i] = state
        if self.sampler is not None:
            self.sampler_rng.append(self.sampler.generator.get_state())
            batch = self.sampler.sample()
        else:
            batch = self.task.train.sample()
            self.batches.append(batch)
        self.last_batch = batch
        self.cpu_rng.append(torch.get_rng_state())
        self.cuda_rng.append(
            torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        )
        self.holders.append([])
        self.running = i
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                return self.learner.step(
                    self.task, state, batch, differentiable=self.differentiable
                )
        finally:
            self.running = None
            self._drop(i)

    def finish(self) -> None:
        """The window's forward pass is over: from now on, holders are read by the backward."""
        self.forward_done = True

    def _drop(self, step: int) -> None:
        for ref in self.holders[step]:
            holder = ref()
            if holder is not None:
                holder.value = None

    def _pack(self, x: Tensor) -> _Holder:
        assert self.running is not None
        holder = _Holder(x.detach(), self.running)  # detached: no cycle through grad_fn
        self.holders[self.running].append(weakref.ref(holder))
        return holder

    def _unpack(self, holder: _Holder) -> Tensor:
        if holder.value is None:
            self._recompute(holder.step)
        value = holder.value
        if value is None:
            raise RuntimeError("internal error: gradient checkpointing lost a saved tensor")
        if holder.step != self.running:
            holder.value = None  # a saved tensor is read once per backward pass: free it now
        return value

    def _recompute(self, j: int) -> None:
        """Refill the holders of step ``j`` (and of the steps before it in its innermost
        segment) by re-running the steps from the nearest checkpoint."""
        if self.forward_done:  # the backward is past the steps after j
            for p in [p for p in self.filled if p > j]:
                self._drop(p)
                self.filled.discard(p)
            for p in [p for p in self.checkpoints if p > j]:
                del self.checkpoints[p]
        a = max(p for p in self.checkpoints if p <= j)
        store, fill = _plan(j, a, self.sizes)
        keep = set(store)
        state = self.checkpoints[a]
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        sampler_state = self.sampler.generator.get_state() if self.sampler is not None else None
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                for p in range(a, j + 1):
                    if p in keep:
                        self.checkpoints[p] = state
                    state = self._rerun(p, state, fill=p >= fill)
        finally:
            if self.sampler is not None:  # leave the sampler where the forward pass left it
                self.sampler.generator.set_state(sampler_state)
        self.filled.update(range(fill, j + 1))
        self.recomputed += j + 1 - a

    def _rerun(self, p: int, state: Any, fill: bool) -> Any:
        """Re-run step ``p`` from ``state``; refill its holders if ``fill``."""
        if self.sampler is not None:
            self.sampler.generator.set_state(self.sampler_rng[p])
            batch = self.sampler.sample()
        else:
            batch = self.batches[p]
        torch.set_rng_state(self.cpu_rng[p])
        cuda_rng = self.cuda_rng[p]
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        originals = self.holders[p]
        saved: list[_Holder] = []  # the re-run's own saved tensors, for its inner grad calls

        def pack(x: Tensor) -> _Holder:
            # Detached: a saved output that kept its grad_fn would form a reference cycle
            # through its own node, and the recomputed graph would never be freed.
            x = x.detach()
            if fill and len(saved) < len(originals):
                holder = originals[len(saved)]()
                if holder is not None:
                    if holder.shape != x.shape or holder.dtype != x.dtype:
                        raise RuntimeError(
                            "gradient checkpointing: the recomputed inner steps differ from the "
                            f"original ones (a saved tensor of shape {tuple(holder.shape)} and "
                            f"{holder.dtype} became {tuple(x.shape)} and {x.dtype}); the "
                            "learner's step must be deterministic"
                        )
                    holder.value = x
            saved.append(_Holder(x, p))
            return saved[-1]

        def unpack(holder: _Holder) -> Tensor:
            if holder.value is None:
                raise RuntimeError("internal error: a re-run step read a dropped tensor")
            return holder.value

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            new_state, _ = self.learner.step(
                self.task, state, batch, differentiable=self.differentiable
            )
        for holder in saved:
            holder.value = None
        if len(saved) != len(originals):
            raise RuntimeError(
                "gradient checkpointing: the recomputed inner steps saved "
                f"{len(saved)} tensors where the original ones saved {len(originals)}; the "
                "learner's step must be deterministic"
            )
        return new_state


class _DivergenceCheck:
    """Whether an inner loss is non-finite or above ``ratio`` times the unroll's first loss."""

    def __init__(self, ratio: float | None) -> None:
        self.ratio = ratio
        self.first: float | None = None

    def __call__(self, loss: Tensor) -> bool:
        value = float(loss.detach())
        if self.first is None:
            self.first = value
        return not math.isfinite(value) or (
            self.ratio is not None and value > self.ratio * max(self.first, 1e-12)
        )


def tell_horizon(state: Any, horizon: int) -> Any:
    """``state`` with the run's length written into its rule state, for rules that read how far
    training has gone (their state has a ``total_steps`` entry); other states unchanged."""
    rule_state = getattr(state, "rule_state", None)
    if isinstance(rule_state, dict) and "total_steps" in rule_state:
        old = rule_state["total_steps"]
        rule_state["total_steps"] = torch.full_like(old, float(horizon))
    return state


def unroll(
    learner: MetaLearner,
    task: Task,
    generator: torch.Generator,
    *,
    horizon: int = 100,
    truncation: int = 20,
    objective: str = "train",
    differentiable: bool = True,
    max_loss_ratio: float | None = None,
    checkpoint_segment: int | Sequence[int] | None = None,
    log_meta_loss: bool = False,
    reference: MetaLearner | None = None,
    loss_aversion: float = 0.0,
) -> Iterator[Window]:
    """Run ``horizon`` inner steps, yielding a :class:`Window` every ``truncation`` steps.

    The consumer backpropagates each window's meta-loss before asking for the next window; the
    state is detached between windows (truncated backpropagation through time).

    Args:
        learner: the meta-learner (f_theta).
        task: the inner problem.
        generator: randomness of the inner state (the initial parameters).
        horizon: inner steps in all (T).
        truncation: inner steps per window (K).
        objective: one of :data:`OBJECTIVES`.
        differentiable: build the graph for meta-gradients (``False`` for evaluation).
        max_loss_ratio: if set, an inner loss that is non-finite or above this multiple of the
            first loss ends the unroll early (flagged ``diverged``) instead of poisoning the
            meta-gradient with it.
        checkpoint_segment: if set, gradient checkpointing (see the module's documentation):
            ``S >= 1``, one level of segments of ``S`` inner steps (:func:`sqrt_segment` is the
            usual choice), or ``(S1, S2, ..., SL)`` with ``S1 > S2 > ... >= 1``, nested levels
            (:func:`checkpoint_schedule` chooses them from K; :func:`schedule_cost` counts the
            recomputation and the states kept). The windows, meta-gradients and batch stream are
            those of the plain unroll. Ignored when ``differentiable`` is ``False`` or grad is
            disabled (there is nothing to keep).
        log_meta_loss: the window's meta-loss is the log of the objective. Its gradient does
            not depend on the scale of the task's loss, so tasks of very different loss scales
            (a mixture of families, random loss rescaling) weigh alike in a meta-batch.
        reference: a second learner (e.g. the rule the meta-training started from, frozen) run
            beside ``learner`` from the same initial state on the same batches, without
            meta-gradients. The window's meta-loss becomes the log-ratio of the two objectives,
            ``log(L / L_ref)`` (requires ``log_meta_loss``), times ``1 + loss_aversion`` when
            it is positive (``learner`` did worse than the reference on this window): a
            loss-averse objective, so that large gains on a few tasks cannot pay for losses on
            others. Once the reference diverges, windows fall back to ``log(L)``.
        loss_aversion: ``lambda >= 0`` above (only with ``reference``).
    """
    if horizon < 1 or truncation < 1:
        raise ValueError(f"Invalid horizon/truncation: {horizon}/{truncation}")
    if objective not in OBJECTIVES:
        raise ValueError(f"Invalid objective {objective!r}; expected one of {OBJECTIVES}")
    if reference is not None and not log_meta_loss:
        raise ValueError("A reference learner needs log_meta_loss (the meta-loss is a log-ratio)")
    if not (math.isfinite(loss_aversion) and loss_aversion >= 0):
        raise ValueError(f"Invalid loss_aversion: {loss_aversion} (must be >= 0)")
    sizes = None if checkpoint_segment is None else checkpoint_segments(checkpoint_segment)
    ref_state = None
    if reference is not None:  # the same phi_0: a generator in the same state
        ref_generator = torch.Generator(device=generator.device)
        ref_generator.set_state(generator.get_state())
        ref_state = tell_horizon(reference.init_state(task, ref_generator), horizon)
    state = tell_horizon(learner.init_state(task, generator), horizon)
    diverges = _DivergenceCheck(max_loss_ratio)
    for start in range(0, horizon, truncation):
        end = min(start + truncation, horizon)
        losses: list[Tensor] = []
        diverged = False
        checkpointed = None
        if sizes is not None and differentiable and torch.is_grad_enabled():
            checkpointed = _CheckpointedWindow(learner, task, sizes, differentiable)
        ref_losses: list[float] = []
        for _ in range(start, end):
            if checkpointed is not None:
                new_state, loss = checkpointed.step(state)
                batch = checkpointed.last_batch
            else:
                batch = task.train.sample()
                new_state, loss = learner.step(task, state, batch, differentiable=differentiable)
            if ref_state is not None:
                ref_state, ref_loss = reference.step(  # type: ignore[union-attr]
                    task, ref_state, batch, differentiable=False
                )
                ref_losses.append(float(ref_loss))
            if diverges(loss):
                diverged = True
                break  # the diverged step's graph is dropped with new_state
            losses.append(loss)
            state = new_state
        if checkpointed is not None:
            checkpointed.finish()
        train_losses = torch.stack([x.detach() for x in losses]) if losses else torch.zeros(0)
        meta_loss: Tensor | None
        ref_objective: float | None = None
        if not losses:
            meta_loss = None
        elif objective == "train":
            meta_loss = torch.stack(losses).mean()
            if ref_state is not None:
                ref_objective = sum(ref_losses[: len(losses)]) / len(losses)
        else:
            test_batch = task.test.sample()
            meta_loss = learner.evaluate(task, state, test_batch)
            if ref_state is not None:
                with torch.no_grad():
                    ref_objective = float(reference.evaluate(task, ref_state, test_batch))  # type: ignore[union-attr]
        if ref_objective is not None and not (math.isfinite(ref_objective) and ref_objective > 0):
            ref_objective, ref_state = None, None  # the reference diverged: stop running it
        if meta_loss is not None and log_meta_loss:
            meta_loss = torch.log(meta_loss)
            if ref_objective is not None:
                meta_loss = meta_loss - math.log(ref_objective)
                if float(meta_loss.detach()) > 0:
                    meta_loss = meta_loss * (1.0 + loss_aversion)
        if meta_loss is not None and not differentiable:
            meta_loss = meta_loss.detach()
        yield Window(
            meta_loss, train_losses, start, start + len(losses), state, diverged, ref_objective
        )
        if diverged:
            return
        state = learner.detach_state(state)
        if ref_state is not None:
            ref_state = reference.detach_state(ref_state)  # type: ignore[union-attr]


def run_inner(
    learner: MetaLearner, task: Task, generator: torch.Generator, steps: int
) -> tuple[Tensor, Any]:
    """Train ``task`` for ``steps`` inner steps without meta-gradients.

    Returns:
        ``(train_losses, final_state)``; ``train_losses`` has one entry per step taken (fewer than
        ``steps`` if the loss became non-finite).
    """
    losses: list[Tensor] = []
    state = None
    for window in unroll(
        learner, task, generator, horizon=steps, truncation=steps, differentiable=False
    ):
        losses.append(window.train_losses)
        state = window.state
    return torch.cat(losses), state
