"""Tasks and task families.

A :class:`Task` is one inner training problem: a model used functionally through
``torch.func.functional_call``, a loss, a way to draw fresh initial parameters, and samplers of
training and held-out batches. It holds no live parameters: learners and optimizers own those. A
:class:`TaskFamily` samples tasks from a ``torch.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["Batch", "BatchSampler", "Task", "TaskFamily", "FlatSpec", "uniform_init"]

Batch = tuple[Tensor, Tensor]


class BatchSampler:
    """Random minibatches from fixed tensors: each example of a batch drawn uniformly, with
    replacement (within a batch too: a batch of 32 from 90 rows repeats about 5 of them).

    Args:
        x, y: the data; the first axis indexes examples.
        batch_size: examples per batch; ``None`` or ``>= len(x)`` returns the whole set.
        generator: the stream that picks the batches (owned by the sampler).
    """

    def __init__(
        self, x: Tensor, y: Tensor, batch_size: int | None, generator: torch.Generator
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        if len(x) == 0:
            raise ValueError("Cannot sample batches from an empty dataset")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.generator = generator

    def __len__(self) -> int:
        return len(self.x)

    def full(self) -> Batch:
        """The whole dataset as one batch."""
        return self.x, self.y

    def sample(self) -> Batch:
        """The next random minibatch."""
        if self.batch_size is None or self.batch_size >= len(self.x):
            return self.x, self.y
        idx = torch.randint(len(self.x), (self.batch_size,), generator=self.generator)
        return self.x[idx], self.y[idx]


def positive_sizes(name: str, values: Sequence[int]) -> tuple[int, ...]:
    """``values`` as a tuple of integers, each at least 1 (``ValueError`` otherwise)."""
    sizes = tuple(int(v) for v in values)
    if not sizes or min(sizes) < 1:
        raise ValueError(f"Invalid {name}: {sizes} (need one or more, each at least 1)")
    return sizes


def check_heads(kinds: Sequence[str], widths: Sequence[int], heads: Sequence[int]) -> None:
    """A ``ValueError`` unless, when ``kinds`` has a transformer, every number of heads is at
    least 1 and divides every width."""
    if "transformer" not in kinds:
        return
    if min(heads) < 1 or any(w % h for w in widths for h in heads):
        raise ValueError(f"every width {tuple(widths)} must divide by every heads {tuple(heads)}")


def check_test_batch_size(test_batch_size: int | None) -> int | None:
    """A held-out batch size: ``None`` (the whole held-out set) or at least 1."""
    if test_batch_size is not None and int(test_batch_size) < 1:
        raise ValueError(f"Invalid test_batch_size: {test_batch_size} (None, or at least 1)")
    return test_batch_size


class Task:
    """One inner training problem.

    Args:
        name: a short description (logged).
        model: the architecture; its own parameters are never used or changed.
        loss_fn: ``loss_fn(model_output, target) -> scalar``.
        init_fn: ``init_fn(generator) -> {name: tensor}``, fresh initial parameters.
        train: sampler of training batches (the inner loop's data).
        test: sampler of held-out batches (the meta-objective's data, never trained on).
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        init_fn: Callable[[torch.Generator], dict[str, Tensor]],
        train: BatchSampler,
        test: BatchSampler,
    ) -> None:
        self.name = name
        self.model = model
        self.loss_fn = loss_fn
        self.init_fn = init_fn
        self.train = train
        self.test = test

    def init_params(self, generator: torch.Generator) -> dict[str, Tensor]:
        """Fresh initial parameters drawn from ``generator``: a tensor for each of the model's
        parameters, by name (and possibly buffers).

        Raises:
            ValueError: ``init_fn`` returned no dict, or one without some of the parameters
                (the model's own, never trained, would otherwise stand in for them).
        """
        params = self.init_fn(generator)
        names = [n for n, _ in self.model.named_parameters()]
        if not isinstance(params, Mapping) or not set(names) <= set(params):
            found = sorted(params) if isinstance(params, Mapping) else type(params).__name__
            raise ValueError(
                f"Task {self.name}: init_fn must return a dict with a tensor for each model "
                f"parameter, {names}; it returned {found}"
            )
        return dict(params)

    def loss(self, params: Mapping[str, Tensor], batch: Batch) -> Tensor:
        """The loss of the model with ``params`` on ``batch`` (differentiable in ``params``)."""
        x, y = batch
        loss = self.loss_fn(functional_call(self.model, dict(params), (x,)), y)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            what = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss)
            raise ValueError(f"Task {self.name}: loss_fn must return a scalar tensor, not {what}")
        return loss.reshape(())

    def __repr__(self) -> str:
        return f"Task({self.name})"


class TaskFamily:
    """A distribution over tasks."""

    name: str = "task"

    def sample(self, generator: torch.Generator) -> Task:
        """Draw one task; all of its randomness comes from ``generator``."""
        raise NotImplementedError(f"{type(self).__qualname__} must implement sample()")

    def config(self) -> dict[str, Any]:
        """JSON-serializable description (saved with checkpoints and logs)."""
        return {"name": self.name}


class FlatSpec:
    """Maps named parameter dicts to one flat vector and back (views, no copies).

    The unroll keeps the optimizee's parameters as one flat vector so that each inner step does
    one ``autograd.grad`` and one rule call, whatever the number of parameter tensors.
    """

    def __init__(self, params: Mapping[str, Tensor]) -> None:
        self.names = list(params)
        self.shapes = [tuple(t.shape) for t in params.values()]
        self.numels = [math.prod(s) for s in self.shapes]
        self.numel = sum(self.numels)

    def flatten(self, params: Mapping[str, Tensor]) -> Tensor:
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        parts = flat.split(self.numels)
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes)}


def uniform_init(
    model: nn.Module, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """PyTorch's default ``nn.Linear`` / conv initialization, drawn from ``generator``.

    Weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (what ``kaiming_uniform_(a=sqrt(5))``
    amounts to); other parameters keep their values.
    """
    params: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        owner = modules[owner_name]
        weight = getattr(owner, "weight", None)
        if isinstance(weight, Tensor) and weight.dim() >= 2 and leaf in ("weight", "bias"):
            fan_in = weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            params[name] = (torch.rand(p.shape, generator=generator, dtype=dtype) * 2 - 1) * bound
        else:
            params[name] = p.detach().to(dtype).clone()
    return params
