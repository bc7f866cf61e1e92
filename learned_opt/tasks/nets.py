"""Feed-forward task families on the data parts of :mod:`~learned_opt.tasks.sources`: conv nets
with batch normalization, MLPs (plain or residual with LayerNorm) for classification and
regression, and MLP autoencoders.

Batch normalization uses batch statistics only (``track_running_stats=False``): the model has no
running buffers that a forward pass would change, so it stays a pure function of its parameters
and its batch, as the :class:`~learned_opt.tasks.Task` contract asks; a held-out loss is computed
with the held-out batch's own statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BatchSampler, Task, TaskFamily, check_test_batch_size, uniform_init
from .mlp import ACTIVATIONS, make_mlp
from .sources import SOURCES, load_part

__all__ = [
    "AutoencoderFamily",
    "BNConvFamily",
    "ResidualMLP",
    "SourceMLPFamily",
    "autoencoder",
    "bn_conv_net",
]


_POOLED: dict[tuple[str, str, int], tuple[Tensor, Tensor]] = {}


def _choice(options: Sequence[Any], generator: torch.Generator) -> Any:
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def _choices(name: str, options: Sequence[Any], cast: type = int) -> tuple[Any, ...]:
    options = tuple(cast(o) for o in options)
    if not options:
        raise ValueError(f"{name} needs at least one choice")
    return options


def bn_conv_net(side: int, channels: int, layers: int, out_dim: int, pool: bool) -> nn.Sequential:
    """A conv net with batch norm for flat ``side x side`` grey images.

    ``pool=False``: ``layers`` blocks of ``Conv2d(3x3, stride 2) -> BatchNorm -> ReLU``, then a
    linear read-out of the flattened maps. ``pool=True``: ``Conv2d(3x3, stride 1) -> BatchNorm
    -> ReLU -> MaxPool(2)`` blocks, channels doubling per block, then global average pooling and a
    linear read-out.
    """
    blocks: list[nn.Module] = [nn.Unflatten(1, (1, side, side))]
    c_in, size = 1, side
    for i in range(layers):
        c_out = channels * 2**i if pool else channels
        if pool:
            blocks += [
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out, track_running_stats=False),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            size //= 2
        else:
            blocks += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                nn.BatchNorm2d(c_out, track_running_stats=False),
                nn.ReLU(),
            ]
            size = (size + 1) // 2
        c_in = c_out
    if pool:
        blocks += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, out_dim)]
    else:
        blocks += [nn.Flatten(), nn.Linear(c_in * size * size, out_dim)]
    return nn.Sequential(*blocks)


class ResidualMLP(nn.Module):
    """``Linear(in, d)``, ``depth`` blocks ``x + W2 act(W1 LayerNorm(x))`` (``2d`` hidden units),
    a final LayerNorm and a linear read-out."""

    def __init__(self, in_dim: int, width: int, depth: int, out_dim: int, activation: str) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"Unknown activation {activation!r}")
        self.embed = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width),
                nn.Linear(width, 2 * width),
                ACTIVATIONS[activation](),
                nn.Linear(2 * width, width),
            )
            for _ in range(depth)
        )
        self.ln = nn.LayerNorm(width)
        self.readout = nn.Linear(width, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.readout(self.ln(h))


def autoencoder(in_dim: int, hidden: Sequence[int], activation: str) -> nn.Sequential:
    """``in -> hidden[0] -> ... -> hidden[-1] (the code) -> ... -> hidden[0] -> in``, activations
    after every layer but the code and the (linear) output."""
    act = ACTIVATIONS[activation]
    sizes = [in_dim, *hidden]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), act()]
    layers.pop()  # a linear code
    back = sizes[::-1]
    for a, b in zip(back[:-1], back[1:]):
        layers += [nn.Linear(a, b), act()]
    layers.pop()  # a linear output
    return nn.Sequential(*layers)


class _SourceFamily(TaskFamily):
    """Shared plumbing: the data part, the loss, the samplers and the task."""

    def __init__(
        self, source: str, part: str, batch_sizes: Sequence[int], test_batch_size: int | None
    ) -> None:
        if source not in SOURCES:
            raise ValueError(f"Unknown source {source!r}; expected one of {sorted(SOURCES)}")
        self.source, self.part = source, part
        self.batch_sizes = _choices("batch_sizes", batch_sizes)
        if min(self.batch_sizes) < 1:
            raise ValueError(f"Invalid batch sizes: {self.batch_sizes}")
        self.test_batch_size = check_test_batch_size(test_batch_size)
        xt, yt, _, _ = load_part(source, part)
        self.in_dim = xt.shape[1]
        self.regression = SOURCES[source][0] == "regress"
        self.out_dim = yt.shape[1] if self.regression else int(yt.max()) + 1
        self.side = SOURCES[source][1]

    def _data(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return load_part(self.source, self.part)

    def _task(self, name: str, model: nn.Module, generator: torch.Generator, loss: Any) -> Task:
        batch_size = _choice(self.batch_sizes, generator)
        xt, yt, xh, yh = self._data()
        seed = int(torch.randint(2**62, (1,), generator=generator))
        train = BatchSampler(xt, yt, batch_size, torch.Generator().manual_seed(seed))
        test = BatchSampler(xh, yh, self.test_batch_size, torch.Generator().manual_seed(seed + 1))
        return Task(
            f"{self.source}-{self.part}-{name},bs={batch_size})",
            model,
            loss,
            lambda gen: uniform_init(model, gen),
            train,
            test,
        )

    def _base_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "part": self.part,
            "batch_sizes": list(self.batch_sizes),
            "test_batch_size": self.test_batch_size,
        }


class BNConvFamily(_SourceFamily):
    """:func:`bn_conv_net` classifiers on an image source; channels and depth drawn per task.

    Args:
        source, part: an image source and its part (:mod:`~learned_opt.tasks.sources`).
        channels, layers, batch_sizes: the choices (uniform).
        pool: stride-1 convolutions with max pooling and a global average (see
            :func:`bn_conv_net`) instead of strided convolutions.
        test_batch_size: held-out batch size of ``test.sample()``.
    """

    name = "bn-conv"

    def __init__(
        self,
        source: str = "mnist",
        part: str = "train",
        channels: Sequence[int] = (4, 8),
        layers: Sequence[int] = (2, 3),
        batch_sizes: Sequence[int] = (32, 64),
        pool: bool = False,
        test_batch_size: int | None = 500,
    ) -> None:
        if SOURCES.get(source, ("", None))[1] is None:
            raise ValueError(f"BNConvFamily needs an image source, got {source!r}")
        super().__init__(source, part, batch_sizes, test_batch_size)
        self.channels = _choices("channels", channels)
        self.layers = _choices("layers", layers)
        self.pool = bool(pool)
        if min(self.channels) < 1 or min(self.layers) < 1:
            raise ValueError(f"Invalid channels/layers: {self.channels}/{self.layers}")
        if self.pool and self.side < 2 ** max(self.layers):
            raise ValueError(
                f"{max(self.layers)} pooling blocks do not fit {self.side}x{self.side}"
            )

    def sample(self, generator: torch.Generator) -> Task:
        channels = _choice(self.channels, generator)
        layers = _choice(self.layers, generator)
        model = bn_conv_net(self.side, channels, layers, self.out_dim, self.pool)
        kind = "bn-conv-pool" if self.pool else "bn-conv"
        return self._task(f"{kind}({channels}x{layers}", model, generator, F.cross_entropy)

    def config(self) -> dict[str, Any]:
        return {
            **self._base_config(),
            "channels": list(self.channels),
            "layers": list(self.layers),
            "pool": self.pool,
        }


class SourceMLPFamily(_SourceFamily):
    """MLP classifiers (cross-entropy) or regressors (mean squared error, for a regression
    source) on a source of :mod:`~learned_opt.tasks.sources`; width, depth, activation and batch
    size drawn per task.

    Args:
        source, part: the data.
        widths, depths, activations, batch_sizes: the choices (uniform); depth 0 is linear.
        residual: :class:`ResidualMLP` (``depth`` LayerNorm residual blocks) instead of a plain
            MLP.
        test_batch_size: held-out batch size of ``test.sample()``.
    """

    name = "source-mlp"

    def __init__(
        self,
        source: str,
        part: str,
        widths: Sequence[int] = (32, 64),
        depths: Sequence[int] = (1, 2),
        activations: Sequence[str] = ("relu", "tanh"),
        batch_sizes: Sequence[int] = (32, 64),
        residual: bool = False,
        test_batch_size: int | None = 1000,
    ) -> None:
        super().__init__(source, part, batch_sizes, test_batch_size)
        self.widths = _choices("widths", widths)
        self.depths = _choices("depths", depths)
        self.activations = _choices("activations", activations, str)
        self.residual = bool(residual)
        if any(a not in ACTIVATIONS for a in self.activations) or min(self.depths) < 0:
            raise ValueError(f"Invalid activations/depths: {self.activations}/{self.depths}")

    def sample(self, generator: torch.Generator) -> Task:
        width = _choice(self.widths, generator)
        depth = _choice(self.depths, generator)
        act = _choice(self.activations, generator)
        if self.residual:
            model: nn.Module = ResidualMLP(self.in_dim, width, depth, self.out_dim, act)
            shape = f"resmlp-ln({width}x{depth},{act}"
        else:
            model = make_mlp(self.in_dim, [width] * depth, self.out_dim, act)
            shape = f"mlp({'-'.join([str(width)] * depth) or 'linear'},{act}"
        loss = F.mse_loss if self.regression else F.cross_entropy
        return self._task(shape, model, generator, loss)

    def config(self) -> dict[str, Any]:
        return {
            **self._base_config(),
            "widths": list(self.widths),
            "depths": list(self.depths),
            "activations": list(self.activations),
            "residual": self.residual,
        }


class AutoencoderFamily(_SourceFamily):
    """MLP autoencoders (:func:`autoencoder`, mean squared reconstruction error of the pixels)
    on an image source; the labels are not used.

    Args:
        source, part: the data.
        hiddens: choices of encoder widths, the last one the code, e.g. ``((128, 16),)``.
        activations, batch_sizes: the choices (uniform).
        downsample: average-pool the images by this factor first (2: 28x28 -> 14x14).
        test_batch_size: held-out batch size of ``test.sample()``.
    """

    name = "autoencoder"

    def __init__(
        self,
        source: str = "mnist",
        part: str = "test",
        hiddens: Sequence[Sequence[int]] = ((128, 16),),
        activations: Sequence[str] = ("relu",),
        batch_sizes: Sequence[int] = (64,),
        downsample: int = 1,
        test_batch_size: int | None = 500,
    ) -> None:
        super().__init__(source, part, batch_sizes, test_batch_size)
        if self.side is None or downsample < 1 or self.side % downsample:
            raise ValueError(f"Cannot downsample {source!r} images by {downsample}")
        self.downsample = int(downsample)
        self.side //= self.downsample
        self.in_dim = self.side * self.side
        self.hiddens = tuple(tuple(int(h) for h in hidden) for hidden in hiddens)
        self.activations = _choices("activations", activations, str)
        if not self.hiddens or any(not h or min(h) < 1 for h in self.hiddens):
            raise ValueError(f"Invalid hidden sizes: {self.hiddens}")
        if any(a not in ACTIVATIONS for a in self.activations):
            raise ValueError(f"Unknown activations: {self.activations}")
        self.out_dim = self.in_dim

    def _data(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        key = (self.source, self.part, self.downsample)
        if key not in _POOLED:
            xt, _, xh, _ = load_part(self.source, self.part)
            side, k = self.side * self.downsample, self.downsample
            xt, xh = (
                F.avg_pool2d(x.view(-1, 1, side, side), k).reshape(len(x), -1) for x in (xt, xh)
            )
            _POOLED[key] = (xt, xh)
        xt, xh = _POOLED[key]
        return xt, xt, xh, xh  # targets: the inputs themselves

    def sample(self, generator: torch.Generator) -> Task:
        hidden = _choice(self.hiddens, generator)
        act = _choice(self.activations, generator)
        model = autoencoder(self.in_dim, hidden, act)
        shape = f"autoencoder({'-'.join(map(str, hidden))},{act}"
        return self._task(shape, model, generator, F.mse_loss)

    def config(self) -> dict[str, Any]:
        return {
            **self._base_config(),
            "hiddens": [list(h) for h in self.hiddens],
            "activations": list(self.activations),
            "downsample": self.downsample,
        }
