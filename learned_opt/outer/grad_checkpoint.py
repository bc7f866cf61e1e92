"""Gradient checkpointing of a truncation window: recomputation traded for memory.

With ``unroll(..., checkpoint_segment=...)`` the meta-backward of a window of K inner steps
recomputes instead of keeping. The forward pass runs the K steps once and
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
meta-gradients for :class:`~learned_opt.learners.OptimizerLearner`. :class:`CheckpointedWindow`
below is the same non-reentrant scheme (``saved_tensors_hooks``), with the saved tensors of each
step kept while that step's own forward runs and dropped when it ends.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..learners import MetaLearner
from ..tasks import Batch, BatchSampler, Task

__all__ = [
    "CheckpointedWindow",
    "checkpoint_schedule",
    "checkpoint_segments",
    "schedule_cost",
    "sqrt_segment",
]


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


class CheckpointedWindow:
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
