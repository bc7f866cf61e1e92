"""Label noise on any classification family: a noise floor under every task's training loss.

A meta-objective that is the log of a final training loss rewards most what drives an already
small loss smaller: a classifier that can memorize its training set (small models on MNIST or
8x8 digits, 1,000 steps) contributes orders of magnitude of log loss, a task with a noise floor
a few percent. Weights meta-trained on such a mixture learn to polish memorizable tasks, which
the validation and sealed test groups (noise floors, held-out text, bottlenecks) do not reward.
:class:`LabelNoiseFamily` replaces a fraction of each task's training labels with another
class, so every classification task keeps a floor (as ``label_noise`` of
:class:`~learned_opt.tasks.zoo.RandomMLPFamily` does for one family); the held-out split stays
clean.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import BatchSampler, Task, TaskFamily
from .zoo import noisy_labels

__all__ = ["LabelNoiseFamily"]


class LabelNoiseFamily(TaskFamily):
    """Tasks of ``family`` with about ``fraction`` of their training labels replaced by another
    class (:func:`~learned_opt.tasks.zoo.noisy_labels`; which ones is drawn per task).

    Only tasks whose training sampler is a :class:`~learned_opt.tasks.base.BatchSampler` of
    one integer class label per example change; regression tasks and language models (which
    have their own floors) are returned as drawn. The inner task is drawn first, from the same
    generator, so ``LabelNoiseFamily(f, p)`` and ``f`` give the same tasks up to the labels.

    Args:
        family: the task family.
        fraction: the fraction of training labels replaced, in ``[0, 1)``.
    """

    name = "label-noise"

    def __init__(self, family: TaskFamily, fraction: float) -> None:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"Invalid label noise fraction: {fraction} (must be in [0, 1))")
        self.family = family
        self.fraction = float(fraction)

    def sample(self, generator: torch.Generator) -> Task:
        task = self.family.sample(generator)
        train, test = task.train, task.test
        seed = int(torch.randint(2**62, (1,), generator=generator))
        if not (
            self.fraction > 0
            and isinstance(train, BatchSampler)
            and train.y.dim() == 1
            and not train.y.is_floating_point()
        ):
            return task
        classes = int(train.y.max()) + 1
        if isinstance(test, BatchSampler) and test.y.dim() == 1:
            classes = max(classes, int(test.y.max()) + 1)
        if classes < 2:
            return task
        labels = noisy_labels(train.y, self.fraction, classes, seed)
        noisy = BatchSampler(train.x, labels, train.batch_size, train.generator)
        return Task(
            f"{task.name}[noise={self.fraction:g}]",
            task.model,
            task.loss_fn,
            task.init_fn,
            noisy,
            test,
        )

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "family": self.family.config(), "fraction": self.fraction}
