"""Attention or recurrent classifiers reading images as sequences of patches, as tasks.

- :class:`PatchSequenceClassifier`: an image cut into patches (rows, by default) read by a
  pre-LayerNorm transformer encoder (mean-pooled) or a recurrent cell (last state).
- :class:`PatchSequenceFamily`: a task family drawing its sizes per task.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    BatchSampler,
    Task,
    TaskFamily,
    check_heads,
    check_test_batch_size,
    positive_sizes,
)
from .sequence import CELLS, Recurrent, TransformerBlock, _choice, _choices, init_model
from .sources import SOURCES, load_part

__all__ = ["PatchSequenceClassifier", "PatchSequenceFamily"]


class PatchSequenceClassifier(nn.Module):
    """Classifies a flat ``side x side`` image read as a sequence of ``patch x patch`` patches
    (``patch=None``: rows, one token per row).

    ``kind="transformer"``: linear patch embedding, learned positions, ``layers`` pre-LN
    encoder blocks (not causal), a final LayerNorm and the mean over tokens; a recurrent ``kind``
    (``"rnn"``, ``"gru"``, ``"lstm"``): the last hidden state of one recurrent layer. Then a
    linear read-out.
    """

    def __init__(
        self,
        side: int,
        out_dim: int,
        kind: str,
        width: int,
        layers: int = 1,
        heads: int = 2,
        patch: int | None = None,
    ) -> None:
        super().__init__()
        if patch is not None and side % patch:
            raise ValueError(f"patch {patch} does not tile images of side {side}")
        if kind != "transformer" and kind not in CELLS:
            raise ValueError(f"Unknown kind {kind!r}; expected 'transformer' or one of {CELLS}")
        self.side, self.patch, self.kind = side, patch, kind
        tokens, token_dim = (side, side) if patch is None else ((side // patch) ** 2, patch**2)
        if kind == "transformer":
            self.embed = nn.Linear(token_dim, width)
            self.pos = nn.Parameter(torch.zeros(tokens, width))
            self.blocks = nn.ModuleList(
                TransformerBlock(width, heads, causal=False) for _ in range(layers)
            )
            self.ln = nn.LayerNorm(width)
        else:
            self.rnn = Recurrent(token_dim, width, kind)
        self.readout = nn.Linear(width, out_dim)

    def tokens(self, x: Tensor) -> Tensor:
        b, s = x.shape[0], self.side
        if self.patch is None:
            return x.reshape(b, s, s)
        p, n = self.patch, s // self.patch
        return x.reshape(b, n, p, n, p).permute(0, 1, 3, 2, 4).reshape(b, n * n, p * p)

    def forward(self, x: Tensor) -> Tensor:
        seq = self.tokens(x)
        if self.kind != "transformer":
            return self.readout(self.rnn(seq)[:, -1])
        h = self.embed(seq) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.readout(self.ln(h).mean(dim=1))


class PatchSequenceFamily(TaskFamily):
    """:class:`PatchSequenceClassifier` tasks on an image source of
    :mod:`~learned_opt.tasks.sources`; kind, width, depth, heads and batch size drawn per task.

    Args:
        source, part: the data (:func:`~learned_opt.tasks.sources.load_part`).
        kinds, widths, layers, heads, batch_sizes: the choices (uniform).
        patch: patch side (``None``: rows).
        test_batch_size: held-out batch size of ``test.sample()``.
    """

    name = "patch-sequence"

    def __init__(
        self,
        source: str = "mnist",
        part: str = "train",
        kinds: Sequence[str] = ("transformer",),
        widths: Sequence[int] = (16, 32),
        layers: Sequence[int] = (1,),
        heads: Sequence[int] = (2,),
        batch_sizes: Sequence[int] = (32, 64),
        patch: int | None = None,
        test_batch_size: int | None = 500,
    ) -> None:
        kind, side = SOURCES.get(source, ("", None))
        if kind != "class" or side is None:
            raise ValueError(f"PatchSequenceFamily needs an image classification source: {source}")
        self.source, self.part, self.side, self.patch = source, part, side, patch
        self.kinds = _choices("kinds", kinds)
        self.widths = positive_sizes("widths", _choices("widths", widths))
        self.layers = tuple(int(n) for n in _choices("layers", layers))
        self.heads = tuple(int(h) for h in _choices("heads", heads))
        check_heads(self.kinds, self.widths, self.heads)
        self.batch_sizes = positive_sizes("batch_sizes", _choices("batch_sizes", batch_sizes))
        self.test_batch_size = check_test_batch_size(test_batch_size)
        _, yt, _, _ = load_part(source, part)
        self.out_dim = int(yt.max()) + 1
        PatchSequenceClassifier(side, self.out_dim, self.kinds[0], self.widths[0], patch=patch)

    def sample(self, generator: torch.Generator) -> Task:
        kind = _choice(self.kinds, generator)
        width = _choice(self.widths, generator)
        layers = _choice(self.layers, generator)
        heads = _choice(self.heads, generator)
        batch_size = _choice(self.batch_sizes, generator)
        seed = int(torch.randint(2**62, (1,), generator=generator))
        xt, yt, xh, yh = load_part(self.source, self.part)
        model = PatchSequenceClassifier(
            self.side, self.out_dim, kind, width, layers, heads, self.patch
        )
        train = BatchSampler(xt, yt, batch_size, torch.Generator().manual_seed(seed))
        test = BatchSampler(xh, yh, self.test_batch_size, torch.Generator().manual_seed(seed + 1))
        tokens = "rows" if self.patch is None else f"{self.patch}x{self.patch}"
        shape = f"{kind}({width}x{layers}" + (f",h{heads}" if kind == "transformer" else "")
        return Task(
            f"{self.source}-{self.part}-{shape},{tokens},bs={batch_size})",
            model,
            F.cross_entropy,
            lambda gen: init_model(model, gen),
            train,
            test,
        )

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "part": self.part,
            "kinds": list(self.kinds),
            "widths": list(self.widths),
            "layers": list(self.layers),
            "heads": list(self.heads),
            "batch_sizes": list(self.batch_sizes),
            "patch": self.patch,
            "test_batch_size": self.test_batch_size,
        }
