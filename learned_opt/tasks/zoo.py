"""More task families on real, offline datasets: MLPs of drawn architectures, small conv nets,
recurrent networks reading images row by row, and tabular problems from scikit-learn.

Every family draws its architecture (from the given choices) and its data stream from the
generator passed to :meth:`~learned_opt.tasks.TaskFamily.sample`, follows the :class:`Task`
contract (the model is used through ``functional_call``; :func:`uniform_init` draws the initial
parameters) and has a ``holdout`` of ``"val"`` (meta-training, weight selection) or ``"test"``
(final figures), as :class:`~learned_opt.tasks.MLPFamily`.

Datasets (:data:`DATASETS`): ``"mnist"`` (60k 28x28 digits), ``"digits"`` (scikit-learn's 1,797
8x8 digits), ``"wine"`` (178 wines, 13 features, 3 classes), ``"breast_cancer"`` (569 tumours,
30 features, 2 classes), ``"iris"`` (150 flowers, 4 features, 3 classes) and ``"diabetes"`` (442
patients, 10 features, a disease-progression score; regression with the mean squared error). The
scikit-learn tables ship inside the package; their features (and the diabetes target) are
standardized with the training part's statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BatchSampler, Task, TaskFamily, check_test_batch_size, uniform_init
from .fewshot import conv_net
from .mlp import ACTIVATIONS, load_split, make_mlp

__all__ = [
    "DATASETS",
    "ConvFamily",
    "RandomMLPFamily",
    "RowRNN",
    "RowRNNFamily",
    "load_dataset",
    "noisy_labels",
]

#: dataset -> (kind, image side or None). ``kind`` is "class" (cross-entropy) or "regress" (MSE).
DATASETS: dict[str, tuple[str, int | None]] = {
    "mnist": ("class", 28),
    "digits": ("class", 8),
    "wine": ("class", None),
    "breast_cancer": ("class", None),
    "iris": ("class", None),
    "diabetes": ("regress", None),
}

_TABLES: dict[tuple[str, str], tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def _load_table(name: str, holdout: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    key = (name, holdout)
    if key in _TABLES:
        return _TABLES[key]
    import numpy as np

    from ..data import sklearn_datasets, train_val_split

    bunch = getattr(sklearn_datasets(f"the {name} tasks"), f"load_{name}")()
    x = torch.as_tensor(np.asarray(bunch.data, dtype=np.float32))
    if DATASETS[name][0] == "regress":
        y = torch.as_tensor(np.asarray(bunch.target, dtype=np.float32)).unsqueeze(1)
    else:
        y = torch.as_tensor(np.asarray(bunch.target, dtype=np.int64))
    n = len(x)
    (rest_x, rest_y), (test_x, test_y) = train_val_split(x, y, n // 5, seed=0)
    if holdout == "val":
        (xt, yt), (xh, yh) = train_val_split(rest_x, rest_y, n // 5, seed=1)
    else:
        xt, yt, xh, yh = rest_x, rest_y, test_x, test_y
    mean, std = xt.mean(0), xt.std(0).clamp_min(1e-6)
    xt, xh = (xt - mean) / std, (xh - mean) / std
    if DATASETS[name][0] == "regress":
        y_mean, y_std = yt.mean(0), yt.std(0).clamp_min(1e-6)
        yt, yh = (yt - y_mean) / y_std, (yh - y_mean) / y_std
    _TABLES[key] = (xt, yt, xh, yh)
    return _TABLES[key]


def load_dataset(name: str, holdout: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_heldout, y_heldout)`` of one of :data:`DATASETS`; rows of ``x`` are
    flat float32 vectors (images: pixels in [0, 1]; tables: standardized features).

    Args:
        name: a key of :data:`DATASETS`.
        holdout: ``"val"`` (a split of the training data) or ``"test"`` (MNIST's official test
            set; 297 of digits' 1,797 rows; a disjoint fifth of the other datasets).
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    if holdout not in ("val", "test"):
        raise ValueError(f"Invalid holdout {holdout!r}; use 'val' or 'test'")
    if name in ("mnist", "digits"):
        return load_split(name, holdout)
    return _load_table(name, holdout)


def noisy_labels(labels: Tensor, fraction: float, classes: int, seed: int = 0) -> Tensor:
    """``labels`` with about ``fraction`` of them (drawn with ``seed``) replaced by another class,
    uniformly: a noise floor that keeps the cross-entropy of small, separable datasets well above
    zero (a model can still memorize some of them)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"Invalid label noise fraction: {fraction} (must be in [0, 1))")
    if fraction == 0.0:
        return labels
    gen = torch.Generator().manual_seed(seed)
    flip = torch.rand(labels.shape, generator=gen) < fraction
    shift = torch.randint(1, classes, labels.shape, generator=gen)
    return torch.where(flip, (labels + shift) % classes, labels)


def _choice(options: Sequence[Any], generator: torch.Generator) -> Any:
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def _check_choices(name: str, options: Sequence[Any]) -> tuple[Any, ...]:
    options = tuple(options)
    if not options:
        raise ValueError(f"{name} needs at least one choice")
    return options


class _DatasetFamily(TaskFamily):
    """Shared plumbing: the dataset, the loss, the samplers and the task."""

    def __init__(
        self,
        dataset: str,
        batch_sizes: Sequence[int],
        test_batch_size: int | None,
        holdout: str,
        label_noise: float = 0.0,
    ) -> None:
        if dataset not in DATASETS:
            raise ValueError(f"Unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}")
        self.dataset = dataset
        self.batch_sizes = tuple(int(b) for b in _check_choices("batch_sizes", batch_sizes))
        if min(self.batch_sizes) < 1:
            raise ValueError(f"Invalid batch sizes: {self.batch_sizes}")
        self.test_batch_size = check_test_batch_size(test_batch_size)
        self.holdout = holdout
        xt, yt, _, _ = load_dataset(dataset, holdout)
        self.in_dim = xt.shape[1]
        self.regression = DATASETS[dataset][0] == "regress"
        self.out_dim = yt.shape[1] if self.regression else int(yt.max()) + 1
        if label_noise and self.regression:
            raise ValueError(f"label_noise needs a classification dataset, not {dataset!r}")
        noisy_labels(yt, label_noise, self.out_dim)  # validates the fraction
        self.label_noise = float(label_noise)

    def _task(self, name: str, model: nn.Module, generator: torch.Generator) -> Task:
        batch_size = _choice(self.batch_sizes, generator)
        xt, yt, xh, yh = load_dataset(self.dataset, self.holdout)
        if self.label_noise:  # the training labels only: the held-out split stays clean
            yt = noisy_labels(yt, self.label_noise, self.out_dim)
            name = f"{name},noise={self.label_noise:g}"
        seed = int(torch.randint(2**62, (1,), generator=generator))
        train = BatchSampler(xt, yt, batch_size, torch.Generator().manual_seed(seed))
        test = BatchSampler(xh, yh, self.test_batch_size, torch.Generator().manual_seed(seed + 1))

        def init_fn(gen: torch.Generator) -> dict[str, Tensor]:
            return uniform_init(model, gen)

        loss = F.mse_loss if self.regression else F.cross_entropy
        return Task(f"{self.dataset}-{name},bs={batch_size})", model, loss, init_fn, train, test)

    def _base_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dataset": self.dataset,
            "batch_sizes": list(self.batch_sizes),
            "test_batch_size": self.test_batch_size,
            "holdout": self.holdout,
            **({"label_noise": self.label_noise} if self.label_noise else {}),
        }


class RandomMLPFamily(_DatasetFamily):
    """MLPs whose width, depth and activation are drawn per task, on one dataset.

    Every hidden layer of a task has the same width. Depth 0 is a linear (softmax or least
    squares) model.

    Args:
        dataset: a key of :data:`DATASETS`.
        widths, depths, activations, batch_sizes: the choices (uniform).
        test_batch_size: held-out batch size of the meta-objective (``None``: the whole split).
        holdout: ``"val"`` or ``"test"``.
        label_noise: the fraction of training labels replaced by another class
            (:func:`noisy_labels`; the same ones in every task of the family).
    """

    name = "random-mlp"

    def __init__(
        self,
        dataset: str = "mnist",
        widths: Sequence[int] = (16, 32, 64),
        depths: Sequence[int] = (1, 2),
        activations: Sequence[str] = ("sigmoid", "tanh", "relu", "gelu"),
        batch_sizes: Sequence[int] = (32, 64, 128),
        test_batch_size: int | None = 1000,
        holdout: str = "val",
        label_noise: float = 0.0,
    ) -> None:
        super().__init__(dataset, batch_sizes, test_batch_size, holdout, label_noise)
        self.widths = tuple(int(w) for w in _check_choices("widths", widths))
        self.depths = tuple(int(d) for d in _check_choices("depths", depths))
        self.activations = tuple(_check_choices("activations", activations))
        bad = [a for a in self.activations if a not in ACTIVATIONS]
        if bad or min(self.widths) < 1 or min(self.depths) < 0:
            raise ValueError(
                f"Invalid MLP choices: widths={self.widths}, depths={self.depths}, "
                f"activations={self.activations} (known: {sorted(ACTIVATIONS)})"
            )

    def sample(self, generator: torch.Generator) -> Task:
        width = _choice(self.widths, generator)
        depth = _choice(self.depths, generator)
        act = _choice(self.activations, generator)
        model = make_mlp(self.in_dim, [width] * depth, self.out_dim, act)
        return self._task(
            f"mlp({'-'.join([str(width)] * depth) or 'linear'},{act}", model, generator
        )

    def config(self) -> dict[str, Any]:
        return {
            **self._base_config(),
            "widths": list(self.widths),
            "depths": list(self.depths),
            "activations": list(self.activations),
        }


class ConvFamily(_DatasetFamily):
    """Small conv nets (:func:`~learned_opt.tasks.fewshot.conv_net`: stride-2 3x3 convolutions,
    ReLU, linear read-out) on an image dataset, channels and depth drawn per task.

    Args:
        dataset: ``"mnist"`` or ``"digits"``.
        channels, layers, batch_sizes: the choices (uniform).
        test_batch_size: held-out batch size of the meta-objective.
        holdout: ``"val"`` or ``"test"``.
    """

    name = "conv"

    def __init__(
        self,
        dataset: str = "mnist",
        channels: Sequence[int] = (4, 8),
        layers: Sequence[int] = (2, 3),
        batch_sizes: Sequence[int] = (32, 64),
        test_batch_size: int | None = 500,
        holdout: str = "val",
    ) -> None:
        if DATASETS.get(dataset, ("", None))[1] is None:
            raise ValueError(f"ConvFamily needs an image dataset (mnist, digits), got {dataset!r}")
        super().__init__(dataset, batch_sizes, test_batch_size, holdout)
        self.channels = tuple(int(c) for c in _check_choices("channels", channels))
        self.layers = tuple(int(n) for n in _check_choices("layers", layers))
        if min(self.channels) < 1 or min(self.layers) < 1:
            raise ValueError(f"Invalid channels/layers: {self.channels}/{self.layers}")
        self.side = DATASETS[dataset][1]

    def sample(self, generator: torch.Generator) -> Task:
        channels = _choice(self.channels, generator)
        layers = _choice(self.layers, generator)
        model = conv_net(self.side, channels, layers, self.out_dim)
        return self._task(f"conv({channels}x{layers}", model, generator)

    def config(self) -> dict[str, Any]:
        return {**self._base_config(), "channels": list(self.channels), "layers": list(self.layers)}


class RowRNN(nn.Module):
    """Reads a flat ``side x side`` image as a sequence of ``side`` rows and classifies it from
    the last hidden state.

    The cells are written with ``nn.Linear`` layers (not ``nn.RNN``), so that
    ``functional_call`` and :func:`uniform_init` treat their weights like any linear layer's.

    Args:
        side: image side (sequence length and input size).
        hidden: hidden units.
        out_dim: classes.
        cell: ``"rnn"`` (Elman, tanh) or ``"gru"`` (Cho et al., 2014).
    """

    def __init__(self, side: int, hidden: int, out_dim: int, cell: str = "rnn") -> None:
        super().__init__()
        if cell not in ("rnn", "gru"):
            raise ValueError(f"Unknown cell {cell!r}; use 'rnn' or 'gru'")
        self.side, self.hidden, self.cell = side, hidden, cell
        gates = 1 if cell == "rnn" else 3
        self.input = nn.Linear(side, gates * hidden)
        self.recurrent = nn.Linear(hidden, gates * hidden)
        self.readout = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(x.shape[0], self.side, self.side)
        h = x.new_zeros(x.shape[0], self.hidden)
        inputs = self.input(rows)  # all time steps at once: (batch, side, gates * hidden)
        for t in range(self.side):
            xi, hh = inputs[:, t], self.recurrent(h)
            if self.cell == "rnn":
                h = torch.tanh(xi + hh)
            else:
                xr, xz, xn = xi.chunk(3, dim=1)
                hr, hz, hn = hh.chunk(3, dim=1)
                r = torch.sigmoid(xr + hr)
                z = torch.sigmoid(xz + hz)
                n = torch.tanh(xn + r * hn)
                h = (1 - z) * n + z * h
        return self.readout(h)


class RowRNNFamily(_DatasetFamily):
    """Recurrent classifiers (:class:`RowRNN`) reading images row by row; cell and width drawn
    per task.

    Args:
        dataset: ``"mnist"`` (28 steps of 28 inputs) or ``"digits"`` (8 steps of 8).
        cells: choices among ``"rnn"`` and ``"gru"``.
        hidden, batch_sizes: the choices (uniform).
        test_batch_size: held-out batch size of the meta-objective.
        holdout: ``"val"`` or ``"test"``.
    """

    name = "row-rnn"

    def __init__(
        self,
        dataset: str = "mnist",
        cells: Sequence[str] = ("rnn",),
        hidden: Sequence[int] = (16, 32),
        batch_sizes: Sequence[int] = (32, 64),
        test_batch_size: int | None = 500,
        holdout: str = "val",
    ) -> None:
        if DATASETS.get(dataset, ("", None))[1] is None:
            raise ValueError(
                f"RowRNNFamily needs an image dataset (mnist, digits), got {dataset!r}"
            )
        super().__init__(dataset, batch_sizes, test_batch_size, holdout)
        self.cells = tuple(_check_choices("cells", cells))
        self.hidden = tuple(int(h) for h in _check_choices("hidden", hidden))
        if any(c not in ("rnn", "gru") for c in self.cells) or min(self.hidden) < 1:
            raise ValueError(f"Invalid cells/hidden: {self.cells}/{self.hidden}")
        self.side = DATASETS[dataset][1]

    def sample(self, generator: torch.Generator) -> Task:
        cell = _choice(self.cells, generator)
        hidden = _choice(self.hidden, generator)
        model = RowRNN(self.side, hidden, self.out_dim, cell)
        return self._task(f"{cell}({hidden}", model, generator)

    def config(self) -> dict[str, Any]:
        return {**self._base_config(), "cells": list(self.cells), "hidden": list(self.hidden)}
