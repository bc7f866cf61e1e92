"""MLP classifiers on real datasets (MNIST, scikit-learn digits)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BatchSampler, Task, TaskFamily, check_test_batch_size, uniform_init

__all__ = ["ACTIVATIONS", "MLPFamily", "make_mlp", "load_split"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}


def make_mlp(in_dim: int, hidden: Sequence[int], out_dim: int, activation: str) -> nn.Sequential:
    """``Linear -> act -> ... -> Linear`` (no activation after the last layer)."""
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"Unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}"
        )
    layers: list[nn.Module] = []
    sizes = [in_dim, *hidden]
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
    layers.append(nn.Linear(sizes[-1], out_dim))
    return nn.Sequential(*layers)


_SPLITS: dict[tuple[str, str], tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def load_split(dataset: str, holdout: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_heldout, y_heldout)`` for a dataset.

    Args:
        dataset: ``"mnist"`` (60k/10k) or ``"digits"`` (scikit-learn, 1797 images of 8x8).
        holdout: ``"val"``: a validation split carved from the training set (for meta-training and
            weight selection); ``"test"``: the official test set (MNIST) or a disjoint split
            (digits), for final figures.
    """
    key = (dataset, holdout)
    if key in _SPLITS:
        return _SPLITS[key]
    from ..data import load_digits, load_mnist, train_val_split

    if holdout not in ("val", "test"):
        raise ValueError(f"Invalid holdout {holdout!r}; use 'val' or 'test'")
    if dataset == "mnist":
        x, y = load_mnist("train")
        if holdout == "val":
            (xt, yt), (xh, yh) = train_val_split(x, y, 10_000, seed=0)
        else:
            xt, yt = x, y
            xh, yh = load_mnist("test")
    elif dataset == "digits":
        x, y = load_digits()
        (rest_x, rest_y), (test_x, test_y) = train_val_split(x, y, 297, seed=0)
        if holdout == "val":
            (xt, yt), (xh, yh) = train_val_split(rest_x, rest_y, 300, seed=1)
        else:
            xt, yt, xh, yh = rest_x, rest_y, test_x, test_y
    else:
        raise ValueError(f"Unknown dataset {dataset!r}; expected 'mnist' or 'digits'")
    _SPLITS[key] = (xt, yt, xh, yh)
    return _SPLITS[key]


class MLPFamily(TaskFamily):
    """MLP classifiers with fresh initial weights on a fixed dataset.

    The paper's MNIST task is ``MLPFamily("mnist", hidden=(20,), activation="sigmoid",
    batch_size=128)``: a 784-20-10 sigmoid MLP trained with cross-entropy on batches of 128.

    Args:
        dataset: ``"mnist"`` or ``"digits"``.
        hidden: hidden layer widths.
        activation: one of :data:`ACTIVATIONS`.
        batch_size: training batch size.
        test_batch_size: held-out batch size for the meta-objective (``None``: the whole split).
        holdout: see :func:`load_split`.
    """

    name = "mlp"

    def __init__(
        self,
        dataset: str = "mnist",
        hidden: Sequence[int] = (20,),
        activation: str = "sigmoid",
        batch_size: int = 128,
        test_batch_size: int | None = 1000,
        holdout: str = "val",
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"Unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}"
            )
        if batch_size < 1:
            raise ValueError(f"Invalid batch size: {batch_size}")
        self.dataset = dataset
        self.hidden = tuple(int(h) for h in hidden)
        if self.hidden and min(self.hidden) < 1:
            raise ValueError(f"Invalid hidden widths: {self.hidden} (each at least 1)")
        self.activation = activation
        self.batch_size = batch_size
        self.test_batch_size = check_test_batch_size(test_batch_size)
        self.holdout = holdout
        xt, yt, _, _ = load_split(dataset, holdout)
        self.model = make_mlp(xt.shape[1], self.hidden, int(yt.max()) + 1, activation)

    def sample(self, generator: torch.Generator) -> Task:
        xt, yt, xh, yh = load_split(self.dataset, self.holdout)
        seed = int(torch.randint(2**62, (1,), generator=generator))
        train = BatchSampler(xt, yt, self.batch_size, torch.Generator().manual_seed(seed))
        test = BatchSampler(xh, yh, self.test_batch_size, torch.Generator().manual_seed(seed + 1))
        model = self.model

        def init_fn(gen: torch.Generator) -> dict[str, Tensor]:
            return uniform_init(model, gen)

        hidden = "-".join(map(str, self.hidden))
        name = f"{self.dataset}-mlp({hidden},{self.activation},bs={self.batch_size})"
        return Task(name, model, F.cross_entropy, init_fn, train, test)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dataset": self.dataset,
            "hidden": list(self.hidden),
            "activation": self.activation,
            "batch_size": self.batch_size,
            "test_batch_size": self.test_batch_size,
            "holdout": self.holdout,
        }
