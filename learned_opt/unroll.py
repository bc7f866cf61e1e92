"""The inner loop, unrolled in truncation windows. Returns meta-losses; does no I/O.

Gradient checkpointing (``unroll(..., checkpoint_segment=S)``) makes the meta-training memory of
a window grow like sqrt(K) instead of K: the window's inner steps run in segments of ``S`` steps,
only the inner state at segment boundaries is kept, and each segment's activations are
recomputed when the meta-gradient reaches it (one extra forward pass of the inner steps).

Why not ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: a learner's ``step``
calls ``torch.autograd.grad`` on the inner loss *inside* the segment, and that checkpoint treats
every such call as a backward pass that needs the segment's activations, so it recomputes the
segment's prefix at every inner step (quadratic cost) and, in PyTorch 2.13, returns wrong
meta-gradients for :class:`~learned_opt.learners.OptimizerLearner`. :class:`_Recompute` below is
the same non-reentrant scheme (``saved_tensors_hooks``) with one difference: the activations stay
available while the segment's own forward pass runs, and are dropped when it ends.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .learners import MetaLearner
from .tasks import Batch, Task

__all__ = ["OBJECTIVES", "Window", "unroll", "run_inner", "sqrt_segment"]

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
    """

    meta_loss: Tensor | None
    train_losses: Tensor
    start: int
    end: int
    state: Any
    diverged: bool = False


def sqrt_segment(truncation: int) -> int:
    """``ceil(sqrt(K))``: the segment length that balances the boundary states kept (K / S of
    them) against the activations of the one segment recomputed at a time (S steps)."""
    return max(1, math.ceil(math.sqrt(truncation)))


class _Holder:
    """One saved activation of a checkpointed segment; ``value`` is ``None`` while dropped."""

    __slots__ = ("value", "shape", "dtype", "__weakref__")

    def __init__(self, value: Tensor) -> None:
        self.value: Tensor | None = value
        self.shape = value.shape
        self.dtype = value.dtype


class _Recompute:
    """Non-reentrant activation checkpointing of ``fn()`` (a segment of inner steps).

    :meth:`run` calls ``fn`` with ``saved_tensors_hooks`` that route every tensor autograd saves
    through a :class:`_Holder`. The holders keep their tensors while ``fn`` runs (the learner's
    own ``torch.autograd.grad`` calls need them) and drop them when it returns. When a backward
    pass later needs a dropped tensor, ``fn`` runs again, with grad enabled and the random-number
    state of the first run, and its saved tensors refill the holders in order. ``fn`` must
    therefore be deterministic and read the same inputs (the segment's pre-sampled batches and
    its start state, which this object keeps alive through ``fn``'s closure).
    """

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.holders: list[weakref.ref[_Holder]] = []
        self.forward_done = False
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def run(self) -> Any:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            out = self.fn()
        self.forward_done = True
        for ref in self.holders:
            holder = ref()
            if holder is not None:
                holder.value = None
        return out

    def _pack(self, x: Tensor) -> _Holder:
        holder = _Holder(x.detach())  # detached: no reference cycle through grad_fn
        self.holders.append(weakref.ref(holder))
        return holder

    def _unpack(self, holder: _Holder) -> Tensor:
        if holder.value is None:
            self._recompute()
        value = holder.value
        assert value is not None
        if self.forward_done:
            holder.value = None  # a saved tensor is read once per backward pass: free it now
        return value

    def _recompute(self) -> None:
        if not self.forward_done:
            raise RuntimeError("internal error: a saved tensor was dropped during the forward")
        count = 0

        def pack(x: Tensor) -> Tensor:
            nonlocal count
            # Detached: a saved output that kept its grad_fn would form a reference cycle
            # through its own node, and the recomputed graph would never be freed.
            x = x.detach()
            if count < len(self.holders):
                holder = self.holders[count]()
                if holder is not None:
                    if holder.shape != x.shape or holder.dtype != x.dtype:
                        raise RuntimeError(
                            "gradient checkpointing: the recomputed inner steps differ from the "
                            f"original ones (a saved tensor of shape {tuple(holder.shape)} and "
                            f"{holder.dtype} became {tuple(x.shape)} and {x.dtype}); the "
                            "learner's step must be deterministic"
                        )
                    holder.value = x
            count += 1
            return x

        devices = list(range(torch.cuda.device_count())) if self.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state_all(self.cuda_rng)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                self.fn()
        if any(h is not None and h.value is None for h in (ref() for ref in self.holders)):
            raise RuntimeError(
                "gradient checkpointing: the recomputed inner steps saved fewer tensors than the "
                "original ones; the learner's step must be deterministic"
            )


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


def _checkpointed_steps(
    learner: MetaLearner,
    task: Task,
    state: Any,
    batches: list[Batch],
    diverges: _DivergenceCheck,
    differentiable: bool,
) -> tuple[Any, list[Tensor], bool]:
    """Run one inner step per batch (stopping before a step whose loss diverges) under
    :class:`_Recompute`. Returns ``(state, losses, diverged)``."""
    checking, limit = True, len(batches)

    def fn() -> tuple[Any, list[Tensor], bool]:
        s, losses = state, []
        for batch in batches[:limit]:
            new_state, loss = learner.step(task, s, batch, differentiable=differentiable)
            if checking and diverges(loss):
                return s, losses, True  # the diverged step's graph is dropped with new_state
            losses.append(loss)
            s = new_state
        return s, losses, False

    out = _Recompute(fn).run()
    # The recomputation repeats exactly the steps that were kept, without the checks.
    checking, limit = False, len(out[1])
    return out


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
    checkpoint_segment: int | None = None,
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
        checkpoint_segment: if set (``S >= 1``), gradient checkpointing: each window runs in
            segments of ``S`` inner steps; only the states at segment boundaries are kept, and
            each segment is recomputed when the meta-gradient is backpropagated (see
            :func:`sqrt_segment` for the usual choice). The segment's training batches are drawn
            before it runs, in the same order as without checkpointing, so the windows and
            meta-gradients are the same (after a divergence inside a segment, a sampler with a
            ``generator`` is rewound to where the plain unroll leaves it). Ignored when
            ``differentiable`` is ``False`` or grad is disabled (there is nothing to keep).
    """
    if horizon < 1 or truncation < 1:
        raise ValueError(f"Invalid horizon/truncation: {horizon}/{truncation}")
    if objective not in OBJECTIVES:
        raise ValueError(f"Invalid objective {objective!r}; expected one of {OBJECTIVES}")
    if checkpoint_segment is not None and checkpoint_segment < 1:
        raise ValueError(f"Invalid checkpoint_segment: {checkpoint_segment} (must be >= 1)")
    state = learner.init_state(task, generator)
    diverges = _DivergenceCheck(max_loss_ratio)
    for start in range(0, horizon, truncation):
        end = min(start + truncation, horizon)
        losses: list[Tensor] = []
        diverged = False
        if checkpoint_segment is not None and differentiable and torch.is_grad_enabled():
            sampler_rng = getattr(task.train, "generator", None)
            for seg_start in range(start, end, checkpoint_segment):
                n = min(checkpoint_segment, end - seg_start)
                rng = sampler_rng.get_state() if isinstance(sampler_rng, torch.Generator) else None
                batches = [task.train.sample() for _ in range(n)]
                state, seg_losses, diverged = _checkpointed_steps(
                    learner, task, state, batches, diverges, differentiable
                )
                losses += seg_losses
                if diverged:
                    if rng is not None:  # leave the sampler where the plain unroll leaves it
                        sampler_rng.set_state(rng)
                        for _ in range(len(seg_losses) + 1):
                            task.train.sample()
                    break
        else:
            for _ in range(start, end):
                new_state, loss = learner.step(
                    task, state, task.train.sample(), differentiable=differentiable
                )
                if diverges(loss):
                    diverged = True
                    break
                losses.append(loss)
                state = new_state
        train_losses = torch.stack([x.detach() for x in losses]) if losses else torch.zeros(0)
        meta_loss: Tensor | None
        if not losses:
            meta_loss = None
        elif objective == "train":
            meta_loss = torch.stack(losses).mean()
        else:
            meta_loss = learner.evaluate(task, state, task.test.sample())
        if meta_loss is not None and not differentiable:
            meta_loss = meta_loss.detach()
        yield Window(meta_loss, train_losses, start, start + len(losses), state, diverged)
        if diverged:
            return
        state = learner.detach_state(state)


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
