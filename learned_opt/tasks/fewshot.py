"""Few-shot task families: sinusoid regression and N-way K-shot digit classification.

Each task's training sampler (``Task.train``) is its support set D_train and returns the whole
set on every call; its held-out sampler (``Task.test``) is the query set. A learner adapts on the
support set and is scored on the query set, which is what the ``"test"`` objective of
:func:`~learned_opt.outer.unroll` does with ``horizon`` = the number of adaptation steps.

Meta-training and meta-testing tasks come from families built with ``split="train"`` and
``split="test"``. For digits the two splits use disjoint classes; for sinusoids the distribution
is the same and the split only selects an independent stream of tasks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BatchSampler, Task, TaskFamily, uniform_init
from .mlp import make_mlp

__all__ = [
    "DIGIT_CLASSES",
    "DigitsFewShotFamily",
    "MNISTFewShotFamily",
    "SinusoidFamily",
    "conv_net",
]

_SPLITS = ("train", "test")
#: Mixed into every task seed so that the two splits draw independent task streams.
_SPLIT_SALT = {"train": 0x5EED_0000, "test": 0x7E57_0000}
#: Digit classes of each split (disjoint, so that 5-way tasks exist in both).
DIGIT_CLASSES: dict[str, tuple[int, ...]] = {"train": (0, 1, 2, 3, 4), "test": (5, 6, 7, 8, 9)}


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"Invalid split {split!r}; expected one of {_SPLITS}")


def _split_generator(generator: torch.Generator, split: str) -> torch.Generator:
    """A fresh generator for one task, from one draw of ``generator`` and the split."""
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return torch.Generator().manual_seed(seed ^ _SPLIT_SALT[split])


def _whole_set(x: Tensor, y: Tensor, generator: torch.Generator) -> BatchSampler:
    return BatchSampler(x, y, None, generator)


class SinusoidFamily(TaskFamily):
    """Few-shot regression of ``y = A sin(x - p)`` (Finn et al., 2017).

    Amplitude ``A ~ U[0.1, 5]``, phase ``p ~ U[0, pi]``, inputs ``x ~ U[-5, 5]``; the model is a
    1-40-40-1 ReLU MLP trained with the mean squared error.

    Args:
        k_shot: support points per task.
        n_query: query points per task.
        split: ``"train"`` (meta-training) or ``"test"`` (meta-testing). Both splits have the
            same task distribution; the split is mixed into each task's seed, so a given
            generator yields different tasks in the two splits.
        hidden: hidden layer widths of the model.
    """

    name = "sinusoid"

    def __init__(
        self,
        k_shot: int = 10,
        n_query: int = 50,
        split: str = "train",
        hidden: tuple[int, ...] = (40, 40),
    ) -> None:
        _check_split(split)
        if k_shot < 1 or n_query < 1:
            raise ValueError(f"Invalid k_shot/n_query: {k_shot}/{n_query} (must be >= 1)")
        self.k_shot = k_shot
        self.n_query = n_query
        self.split = split
        self.hidden = tuple(int(h) for h in hidden)
        self.model = make_mlp(1, self.hidden, 1, "relu")

    def sample(self, generator: torch.Generator) -> Task:
        gen = _split_generator(generator, self.split)
        amplitude = 0.1 + 4.9 * float(torch.rand((), generator=gen))
        phase = math.pi * float(torch.rand((), generator=gen))
        x = torch.rand(self.k_shot + self.n_query, 1, generator=gen) * 10.0 - 5.0
        y = amplitude * torch.sin(x - phase)
        k = self.k_shot
        train = _whole_set(x[:k], y[:k], torch.Generator().manual_seed(0))
        test = _whole_set(x[k:], y[k:], torch.Generator().manual_seed(1))
        model = self.model

        def init_fn(g: torch.Generator) -> dict[str, Tensor]:
            return uniform_init(model, g)

        name = f"sinusoid(A={amplitude:.3g},p={phase:.3g},k={k},{self.split})"
        return Task(name, model, F.mse_loss, init_fn, train, test)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "k_shot": self.k_shot,
            "n_query": self.n_query,
            "split": self.split,
            "hidden": list(self.hidden),
        }


class _ClassFewShotFamily(TaskFamily):
    """N-way K-shot classification over the classes of one split of a labelled image set.

    Each task picks ``n_way`` classes of its split, relabels them ``0 .. n_way - 1`` in a random
    order and draws, without replacement, ``k_shot`` support and ``n_query`` query images per
    class. The support set is shuffled (sequence learners see the classes interleaved); the query
    set is not. Subclasses provide the images (:meth:`_images`) and the model (:meth:`_model`).

    With ``augment``, every class also appears under the seven other symmetries of the square
    (rotations by multiples of 90 degrees, with and without a mirror), each as a class of its own:
    8x the classes, the augmentation of Santoro et al. (2016) and Finn et al. (2017) on Omniglot.
    It is meant for meta-training splits: with five classes, every 5-way task holds the same five
    and a meta-learner can memorize them rather than learn to learn. Classes are then
    ``(class, symmetry)`` pairs, symmetry 0 being the identity.

    With ``shift``, every image of a task (support and query) is translated by its own random
    offset of up to ``shift`` pixels along each axis (zero-filled): variation within a class,
    which makes features learned on the meta-training classes less specific to them (a learner
    that reads the support set through fixed meta-learned features memorizes them otherwise).
    The task's classes and images are those drawn without it.
    """

    name = "fewshot"
    #: classes of each split (disjoint, so that 5-way tasks exist in both).
    classes_of: dict[str, tuple[int, ...]] = DIGIT_CLASSES

    def __init__(
        self,
        n_way: int = 5,
        k_shot: int = 1,
        n_query: int = 15,
        split: str = "train",
        augment: bool = False,
        shift: int = 0,
    ) -> None:
        _check_split(split)
        classes: tuple[Any, ...] = self.classes_of[split]
        if augment:
            classes = tuple((c, t) for c in classes for t in range(8))
        if not 2 <= n_way <= len(classes):
            raise ValueError(f"Invalid n_way {n_way}: split {split!r} has {len(classes)} classes")
        if k_shot < 1 or n_query < 1:
            raise ValueError(f"Invalid k_shot/n_query: {k_shot}/{n_query} (must be >= 1)")
        x, y = self._images()
        side = math.isqrt(x.shape[1])
        if not 0 <= shift < side // 2:
            raise ValueError(f"Invalid shift {shift}: must be in [0, {side // 2 - 1}]")
        self.side, self.shift = side, int(shift)
        if augment:
            self.by_class = {(c, t): _symmetry(x[y == c], side, t) for c, t in classes}
        else:
            self.by_class = {c: x[y == c] for c in classes}
        self.augment = augment
        smallest = min(len(v) for v in self.by_class.values())
        if k_shot + n_query > smallest:
            raise ValueError(f"k_shot + n_query = {k_shot + n_query} exceeds {smallest} images")
        self.n_way = n_way
        self.k_shot = k_shot
        self.n_query = n_query
        self.split = split
        self.classes = classes
        self.in_features = x.shape[1]
        self.model = self._model()

    def _images(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _model(self) -> nn.Module:
        raise NotImplementedError

    def sample(self, generator: torch.Generator) -> Task:
        gen = _split_generator(generator, self.split)
        order = torch.randperm(len(self.classes), generator=gen)[: self.n_way].tolist()
        chosen = [self.classes[i] for i in order]
        k, q = self.k_shot, self.n_query
        support_x, query_x = [], []
        for c in chosen:
            images = self.by_class[c]
            idx = torch.randperm(len(images), generator=gen)[: k + q]
            support_x.append(images[idx[:k]])
            query_x.append(images[idx[k:]])
        labels = torch.arange(self.n_way)
        xs, ys = torch.cat(support_x), labels.repeat_interleave(k)
        shuffle = torch.randperm(len(xs), generator=gen)
        xs, ys = xs[shuffle], ys[shuffle]
        xq, yq = torch.cat(query_x), labels.repeat_interleave(q)
        if self.shift:
            xs, xq = self._translate(xs, gen), self._translate(xq, gen)
        train = _whole_set(xs, ys, torch.Generator().manual_seed(0))
        test = _whole_set(xq, yq, torch.Generator().manual_seed(1))
        model = self.model

        def init_fn(g: torch.Generator) -> dict[str, Tensor]:
            return uniform_init(model, g)

        classes = ",".join(map(str, chosen))
        name = f"{self.name}-{self.n_way}way-{k}shot(classes={classes},{self.split})"
        task = Task(name, model, F.cross_entropy, init_fn, train, test)
        task.classes = tuple(chosen)  # the original class of each label, for inspection
        return task

    def _translate(self, images: Tensor, gen: torch.Generator) -> Tensor:
        """Each flattened image moved by its own offset in ``[-shift, shift]^2``, zero-filled."""
        s, side = self.shift, self.side
        padded = F.pad(images.view(-1, side, side), (s, s, s, s))
        offsets = torch.randint(0, 2 * s + 1, (len(images), 2), generator=gen).tolist()
        out = [padded[i, r : r + side, c : c + side] for i, (r, c) in enumerate(offsets)]
        return torch.stack(out).reshape(len(images), -1)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_way": self.n_way,
            "k_shot": self.k_shot,
            "n_query": self.n_query,
            "split": self.split,
            "augment": self.augment,
            "shift": self.shift,
        }


def _symmetry(images: Tensor, side: int, t: int) -> Tensor:
    """Symmetry ``t`` (0-7) of the square applied to flattened ``side x side`` images."""
    x = images.view(-1, side, side)
    if t >= 4:
        x = x.flip(2)
    return torch.rot90(x, t % 4, (1, 2)).reshape(len(images), -1).contiguous()


class DigitsFewShotFamily(_ClassFewShotFamily):
    """N-way K-shot classification of scikit-learn's 8x8 digits.

    Classes 0-4 for meta-training, 5-9 for meta-testing (:data:`DIGIT_CLASSES`). The model is a
    64-64-n_way ReLU MLP trained with cross-entropy. With only five meta-training classes, learned
    features do not transfer to the other five (a prototypical network trained on 0-4 scores
    below raw pixels on 5-9); :class:`MNISTFewShotFamily` is the harder-to-overfit variant.

    Args:
        n_way: classes per task (at most 5, the number of classes of a split).
        k_shot: support images per class.
        n_query: query images per class.
        split: ``"train"`` or ``"test"``.
        hidden: hidden layer widths of the model.
        augment: the eight symmetries of the square as extra classes (see above).
        shift: random translation of every image by up to this many pixels (see above).
    """

    name = "digits-fewshot"

    def __init__(
        self,
        n_way: int = 5,
        k_shot: int = 1,
        n_query: int = 15,
        split: str = "train",
        hidden: tuple[int, ...] = (64,),
        augment: bool = False,
        shift: int = 0,
    ) -> None:
        self.hidden = tuple(int(h) for h in hidden)
        super().__init__(n_way, k_shot, n_query, split, augment, shift)

    def _images(self) -> tuple[Tensor, Tensor]:
        from ..data import load_digits

        return load_digits()

    def _model(self) -> nn.Module:
        return make_mlp(self.in_features, self.hidden, self.n_way, "relu")

    def config(self) -> dict[str, Any]:
        return {**super().config(), "hidden": list(self.hidden)}


def conv_net(side: int, channels: int, layers: int, out_dim: int) -> nn.Sequential:
    """A small convolutional classifier for flattened ``side x side`` grey images.

    ``layers`` blocks of ``Conv2d(3x3, stride 2, padding 1) -> ReLU`` with ``channels`` maps each,
    then a linear read-out. Strided convolutions instead of pooling keep it cheap on a CPU.
    """
    blocks: list[nn.Module] = [nn.Unflatten(1, (1, side, side))]
    c_in, size = 1, side
    for _ in range(layers):
        blocks += [nn.Conv2d(c_in, channels, 3, stride=2, padding=1), nn.ReLU()]
        c_in, size = channels, (size + 1) // 2
    blocks += [nn.Flatten(), nn.Linear(channels * size * size, out_dim)]
    return nn.Sequential(*blocks)


class MNISTFewShotFamily(_ClassFewShotFamily):
    """N-way K-shot classification of MNIST digits (28x28) with a small convolutional network.

    Classes 0-4 for meta-training, 5-9 for meta-testing, drawn from the 60k training images. The
    model is :func:`conv_net` (three stride-2 3x3 convolutions of ``channels`` maps, ReLU, linear
    read-out).

    Args:
        n_way: classes per task (at most 5).
        k_shot: support images per class.
        n_query: query images per class.
        split: ``"train"`` or ``"test"``.
        channels: feature maps per convolution.
        layers: convolution blocks.
        augment: the eight symmetries of the square as extra classes (see above).
        shift: random translation of every image by up to this many pixels (see above).
    """

    name = "mnist-fewshot"

    def __init__(
        self,
        n_way: int = 5,
        k_shot: int = 1,
        n_query: int = 15,
        split: str = "train",
        channels: int = 32,
        layers: int = 3,
        augment: bool = False,
        shift: int = 0,
    ) -> None:
        if channels < 1 or layers < 1:
            raise ValueError(f"Invalid channels/layers: {channels}/{layers}")
        self.channels, self.layers = int(channels), int(layers)
        super().__init__(n_way, k_shot, n_query, split, augment, shift)

    def _images(self) -> tuple[Tensor, Tensor]:
        from ..data import load_mnist

        return load_mnist("train")

    def _model(self) -> nn.Module:
        return conv_net(28, self.channels, self.layers, self.n_way)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "channels": self.channels, "layers": self.layers}


#: The few-shot families, whose ``split="test"`` is the meta-test split.
FEWSHOT_FAMILIES = (SinusoidFamily, DigitsFewShotFamily, MNISTFewShotFamily)
