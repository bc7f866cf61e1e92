"""Named data parts for the task groups: which examples a task trains and is evaluated on.

A *part* is a disjoint piece of a data source. The task groups (:mod:`learned_opt.tasks.groups`)
declare the parts their tasks read, so that a test can check that meta-training, validation and
the sealed test never read the same examples. :func:`load_part` returns ``(x_train, y_train,
x_heldout, y_heldout)``: the task trains on the first pair and is evaluated on the second, both
inside the part.

Sources and parts (:data:`PARTS`):

- ``mnist``: ``"train"`` (the official 60k training images, as :func:`~learned_opt.tasks.zoo.
  load_dataset` with ``holdout="val"``: 50k / 10k), ``"test"`` (the official 10k test images:
  8k / 2k);
- ``digits``, ``diabetes``, ``iris``, ``wine``: ``"train"`` (the rows that ``holdout="val"``
  reads: digits' 1,500 of 1,797, the tables' four fifths; the rest, ``holdout="test"``, is left
  unread);
- ``shapes`` (:func:`make_shapes`, synthetic 16x16 images of six shapes): ``"val"`` and
  ``"test"``, drawn from different seeds;
- ``textures`` (:func:`make_textures`, synthetic 16x16 images of oriented gratings): ``"val"``;
- ``friedman1`` (``"test"``) and ``friedman3`` (``"val"``): scikit-learn's synthetic regression
  problems (Friedman, 1991) with noise, so the loss has a floor well above zero;
- ``clusters`` (``"test"``): scikit-learn's ``make_classification`` (6 classes in 20 features,
  10% of the labels drawn again at random, so about 8% changed: a floor well above zero);
- ``hastie`` (``"val"``): scikit-learn's ``make_hastie_10_2`` (two classes split by a sphere in
  10 features; Hastie et al., 2009), 10% of the labels flipped.

Tables are standardized with their training half's statistics (regression targets too); images
are pixels in [0, 1]. Everything is offline and deterministic.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["PARTS", "SOURCES", "load_part", "make_shapes", "make_textures", "part_key"]

#: source -> (kind, image side or None); kind is "class", "regress" or "image" (autoencoder).
SOURCES: dict[str, tuple[str, int | None]] = {
    "mnist": ("class", 28),
    "digits": ("class", 8),
    "diabetes": ("regress", None),
    "iris": ("class", None),
    "wine": ("class", None),
    "shapes": ("class", 16),
    "textures": ("class", 16),
    "friedman1": ("regress", None),
    "friedman3": ("regress", None),
    "clusters": ("class", None),
    "hastie": ("class", None),
}

#: source -> the parts that exist.
PARTS: dict[str, tuple[str, ...]] = {
    "mnist": ("train", "test"),
    "digits": ("train",),
    "diabetes": ("train",),
    "iris": ("train",),
    "wine": ("train",),
    "shapes": ("val", "test"),
    "textures": ("val",),
    "friedman1": ("test",),
    "friedman3": ("val",),
    "clusters": ("test",),
    "hastie": ("val",),
}

#: Seeds of the synthetic parts (fixed: a part is the same data on every machine).
_SEEDS: dict[tuple[str, str], int] = {
    ("shapes", "val"): 11,
    ("shapes", "test"): 23,
    ("friedman1", "test"): 37,
    ("friedman3", "val"): 41,
    ("clusters", "test"): 53,
    ("textures", "val"): 61,
    ("hastie", "val"): 67,
}

_CACHE: dict[tuple[str, str], tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def part_key(source: str, part: str) -> str:
    """``"source:part"``, the name under which the groups declare a part."""
    return f"{source}:{part}"


def make_shapes(
    n: int, side: int, generator: torch.Generator, noise: float = 0.35, label_noise: float = 0.05
) -> tuple[Tensor, Tensor]:
    """``n`` noisy ``side x side`` grey images of six shapes and their labels.

    Classes: disk, ring, filled square, square outline, plus, diagonal cross; each of random
    centre, size (radius 2-5 pixels) and intensity (0.4-1), plus Gaussian pixel noise of standard
    deviation ``noise``, clipped to [0, 1]. A fraction ``label_noise`` of the labels is replaced
    by a random class, so no classifier reaches zero loss.

    Returns:
        ``(x, y)``: float32 ``(n, side * side)`` and int64 ``(n,)``.
    """
    y = torch.randint(6, (n,), generator=generator)
    radius = 2.0 + 3.0 * torch.rand(n, generator=generator)
    lo, hi = radius + 0.5, side - 1.5 - radius
    cx = lo + (hi - lo) * torch.rand(n, generator=generator)
    cy = lo + (hi - lo) * torch.rand(n, generator=generator)
    amp = 0.4 + 0.6 * torch.rand(n, generator=generator)
    grid = torch.arange(side, dtype=torch.float32)
    dx = grid.view(1, 1, side) - cx.view(n, 1, 1)
    dy = grid.view(1, side, 1) - cy.view(n, 1, 1)
    r = radius.view(n, 1, 1)
    dist = torch.sqrt(dx * dx + dy * dy)
    box = torch.maximum(dx.abs(), dy.abs())
    masks = torch.stack(
        (
            dist <= r,
            (dist - r).abs() <= 0.8,
            box <= r,
            (box - r).abs() <= 0.6,
            ((dx.abs() <= 0.7) & (dy.abs() <= r)) | ((dy.abs() <= 0.7) & (dx.abs() <= r)),
            ((dx.abs() - dy.abs()).abs() <= 0.8) & (box <= r),
        ),
        dim=1,
    )  # (n, 6, side, side)
    shape = masks[torch.arange(n), y].to(torch.float32)
    x = shape * amp.view(n, 1, 1) + noise * torch.randn(n, side, side, generator=generator)
    flip = torch.rand(n, generator=generator) < label_noise
    y = torch.where(flip, torch.randint(6, (n,), generator=generator), y)
    return x.clamp(0.0, 1.0).reshape(n, side * side), y


def make_textures(
    n: int, side: int, generator: torch.Generator, noise: float = 0.5, label_noise: float = 0.1
) -> tuple[Tensor, Tensor]:
    """``n`` noisy ``side x side`` grey images of oriented gratings and their labels.

    Six classes: three orientations (0, 60 and 120 degrees, each jittered by up to 10) times two
    spatial frequency bands (periods of 6-8 and 2.5-3.5 pixels). Each image is a grating of
    random phase under a Gaussian window of random centre and width (2.5-5 pixels) and random
    contrast (0.3-1) around grey 0.5, plus Gaussian pixel noise of standard deviation ``noise``,
    clipped to [0, 1]. A fraction ``label_noise`` of the labels is replaced by a random class, so
    no classifier reaches zero loss.

    Returns:
        ``(x, y)``: float32 ``(n, side * side)`` and int64 ``(n,)``.
    """
    y = torch.randint(6, (n,), generator=generator)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=generator)  # noqa: E731
    angle = torch.deg2rad((y % 3).to(torch.float32) * 60.0 + u(-10.0, 10.0))
    period = torch.where(y < 3, u(6.0, 8.0), u(2.5, 3.5))
    phase, width = u(0.0, 2 * math.pi), u(2.5, 5.0)
    cx, cy = u(4.0, side - 5.0), u(4.0, side - 5.0)
    contrast = u(0.3, 1.0)
    grid = torch.arange(side, dtype=torch.float32)
    dx = grid.view(1, 1, side) - cx.view(n, 1, 1)
    dy = grid.view(1, side, 1) - cy.view(n, 1, 1)
    along = dx * torch.cos(angle).view(n, 1, 1) + dy * torch.sin(angle).view(n, 1, 1)
    wave = torch.cos(2 * math.pi * along / period.view(n, 1, 1) + phase.view(n, 1, 1))
    window = torch.exp(-(dx * dx + dy * dy) / (2 * width.view(n, 1, 1) ** 2))
    x = 0.5 + 0.5 * contrast.view(n, 1, 1) * window * wave
    x = x + noise * torch.randn(n, side, side, generator=generator)
    flip = torch.rand(n, generator=generator) < label_noise
    y = torch.where(flip, torch.randint(6, (n,), generator=generator), y)
    return x.clamp(0.0, 1.0).reshape(n, side * side), y


def _standardize(
    xt: Tensor, yt: Tensor, xh: Tensor, yh: Tensor, regress: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    mean, std = xt.mean(0), xt.std(0).clamp_min(1e-6)
    xt, xh = (xt - mean) / std, (xh - mean) / std
    if regress:
        y_mean, y_std = yt.mean(0), yt.std(0).clamp_min(1e-6)
        yt, yh = (yt - y_mean) / y_std, (yh - y_mean) / y_std
    return xt, yt, xh, yh


def _sklearn(source: str, seed: int) -> tuple[Tensor, Tensor]:
    import numpy as np

    from ..data import sklearn_datasets

    datasets = sklearn_datasets(f"the {source} data")
    if source == "friedman1":
        x, y = datasets.make_friedman1(n_samples=3000, noise=2.0, random_state=seed)
    elif source == "friedman3":
        x, y = datasets.make_friedman3(n_samples=3000, noise=0.12, random_state=seed)
    elif source == "clusters":
        x, y = datasets.make_classification(
            n_samples=6000,
            n_features=20,
            n_informative=8,
            n_redundant=4,
            n_classes=6,
            n_clusters_per_class=2,
            class_sep=1.0,
            flip_y=0.1,
            random_state=seed,
        )
    elif source == "hastie":
        x, y = datasets.make_hastie_10_2(n_samples=6000, random_state=seed)
        y = (y > 0).astype(np.int64)
        flip = np.random.RandomState(seed + 1).rand(len(y)) < 0.1
        y[flip] = 1 - y[flip]
    else:  # pragma: no cover - guarded by load_part
        raise ValueError(source)
    xs = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if SOURCES[source][0] == "regress":
        return xs, torch.as_tensor(np.asarray(y, dtype=np.float32)).unsqueeze(1)
    return xs, torch.as_tensor(np.asarray(y, dtype=np.int64))


def load_part(source: str, part: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_heldout, y_heldout)`` of one part of a source (see the module).

    Raises:
        ValueError: unknown source or part.
    """
    if source not in PARTS:
        raise ValueError(f"Unknown source {source!r}; expected one of {sorted(PARTS)}")
    if part not in PARTS[source]:
        raise ValueError(f"{source!r} has no part {part!r}; parts: {PARTS[source]}")
    key = (source, part)
    if key in _CACHE:
        return _CACHE[key]
    from ..data import load_mnist, train_val_split
    from .zoo import load_dataset

    if part == "train":  # the parts the existing families read with holdout="val"
        out = load_dataset(source, "val")
    elif source == "mnist":  # the official test set, 8k / 2k
        x, y = load_mnist("test")  # float32 (10000, 784) in [0, 1]
        (xt, yt), (xh, yh) = train_val_split(x, y, 2000, seed=0)
        out = (xt, yt, xh, yh)
    elif source in ("shapes", "textures"):
        make = make_shapes if source == "shapes" else make_textures
        x, y = make(10_000, 16, torch.Generator().manual_seed(_SEEDS[key]))
        n_train = 8000
        out = (x[:n_train], y[:n_train], x[n_train:], y[n_train:])
    else:
        x, y = _sklearn(source, _SEEDS[key])
        n_train = math.floor(0.8 * len(x))
        out = _standardize(
            x[:n_train], y[:n_train], x[n_train:], y[n_train:], SOURCES[source][0] == "regress"
        )
    _CACHE[key] = out
    return out
