"""Sequence models as tasks: character language models on the offline corpus (images read as
sequences of patches are in :mod:`~learned_opt.tasks.patches`).

Every model is written with ``nn.Linear``, ``nn.Embedding``, ``nn.Conv1d`` and ``nn.LayerNorm``
layers only (no ``nn.MultiheadAttention`` or ``nn.LSTM``), so that ``functional_call`` and
:func:`~learned_opt.tasks.uniform_init` treat every weight like a linear layer's and a task's
initial parameters come entirely from the generator given to ``init_params``.

- :class:`CharLM`: next-character prediction with a causal pre-LayerNorm transformer, an LSTM,
  a GRU, an Elman RNN or a causal dilated 1-D conv net (``kind``).
- :class:`CharLMFamily`: a task family drawing its sizes per task. :class:`WindowSampler`
  draws random windows of a text; its ``full()`` is every non-overlapping window (at most
  ``max_full``, evenly spaced; all of them on the corpus's validation and test parts): the
  "whole training set" of a language model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    Batch,
    BatchSampler,
    Task,
    TaskFamily,
    check_heads,
    check_test_batch_size,
    positive_sizes,
    uniform_init,
)

__all__ = [
    "CELLS",
    "CharLM",
    "CharLMFamily",
    "Recurrent",
    "TransformerBlock",
    "WindowSampler",
    "sequence_cross_entropy",
]

#: Recurrent cells of :class:`Recurrent`: name -> gates per hidden unit.
CELLS: dict[str, int] = {"rnn": 1, "gru": 3, "lstm": 4}

_LM_KINDS = ("transformer", "causal-conv", *CELLS)


def _choice(options: Sequence[Any], generator: torch.Generator) -> Any:
    return options[int(torch.randint(len(options), (1,), generator=generator))]


def _choices(name: str, options: Sequence[Any]) -> tuple[Any, ...]:
    options = tuple(options)
    if not options:
        raise ValueError(f"{name} needs at least one choice")
    return options


def init_model(model: nn.Module, generator: torch.Generator) -> dict[str, Tensor]:
    """:func:`uniform_init`, and position embeddings (parameters named ``pos``) drawn from
    U(-1/sqrt(d), 1/sqrt(d)) as well, so nothing comes from the module's own values but the
    LayerNorm gains (1) and offsets (0)."""
    params = uniform_init(model, generator)
    for name, value in params.items():
        if name.rpartition(".")[2] == "pos":
            bound = 1.0 / math.sqrt(value.shape[-1])
            params[name] = (torch.rand(value.shape, generator=generator) * 2 - 1) * bound
    return params


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` (GELU MLP
    of ``mlp_ratio * d`` units); attention written out (softmax of scaled dot products), causal
    or not."""

    def __init__(self, d: int, heads: int, causal: bool, mlp_ratio: int = 2) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"width {d} is not divisible by {heads} heads")
        self.heads, self.causal = heads, causal
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, mlp_ratio * d)
        self.fc2 = nn.Linear(mlp_ratio * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
        if self.causal:
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Recurrent(nn.Module):
    """A recurrent layer over ``(batch, time, features)``: Elman (tanh), GRU or LSTM cell; returns
    every hidden state ``(batch, time, hidden)``."""

    def __init__(self, in_dim: int, hidden: int, cell: str) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"Unknown cell {cell!r}; expected one of {sorted(CELLS)}")
        self.hidden, self.cell = hidden, cell
        self.input = nn.Linear(in_dim, CELLS[cell] * hidden)
        self.recurrent = nn.Linear(hidden, CELLS[cell] * hidden)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        inputs = self.input(x)  # every time step at once
        h = x.new_zeros(b, self.hidden)
        c = x.new_zeros(b, self.hidden)
        out = []
        for s in range(t):
            xi, hh = inputs[:, s], self.recurrent(h)
            if self.cell == "rnn":
                h = torch.tanh(xi + hh)
            elif self.cell == "gru":
                xr, xz, xn = xi.chunk(3, dim=1)
                hr, hz, hn = hh.chunk(3, dim=1)
                r = torch.sigmoid(xr + hr)
                z = torch.sigmoid(xz + hz)
                h = (1 - z) * torch.tanh(xn + r * hn) + z * h
            else:
                i, f, g, o = (xi + hh).chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            out.append(h)
        return torch.stack(out, dim=1)


class _CausalConv(nn.Module):
    """``x + ReLU(conv(x))``, a causal dilated convolution over ``(batch, time, d)``."""

    def __init__(self, d: int, kernel: int, dilation: int) -> None:
        super().__init__()
        self.pad = (kernel - 1) * dilation
        self.conv = nn.Conv1d(d, d, kernel, dilation=dilation)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(F.pad(x.transpose(1, 2), (self.pad, 0))).transpose(1, 2)
        return x + F.relu(y)


class CharLM(nn.Module):
    """A character language model: ``(batch, time)`` ids -> ``(batch, time, vocab)`` logits.

    Args:
        vocab: characters.
        kind: ``"transformer"`` (pre-LN, learned positions, causal), ``"lstm"``, ``"gru"``,
            ``"rnn"`` (``layers`` stacked recurrent layers) or ``"causal-conv"`` (``layers``
            residual causal convolutions of kernel 3, dilations 1, 2, 4, ...).
        width: embedding and hidden width.
        layers: blocks or stacked layers.
        heads: attention heads (transformer).
        seq_len: the longest sequence (transformer positions).
    """

    def __init__(
        self, vocab: int, kind: str, width: int, layers: int = 1, heads: int = 2, seq_len: int = 64
    ) -> None:
        super().__init__()
        if kind not in _LM_KINDS:
            raise ValueError(f"Unknown language model {kind!r}; expected one of {_LM_KINDS}")
        if min(vocab, width, layers, heads, seq_len) < 1:
            raise ValueError(f"Invalid sizes: {vocab}/{width}/{layers}/{heads}/{seq_len}")
        self.kind = kind
        self.embed = nn.Embedding(vocab, width)
        if kind == "transformer":
            self.pos = nn.Parameter(torch.zeros(seq_len, width))
            self.blocks = nn.ModuleList(
                TransformerBlock(width, heads, causal=True) for _ in range(layers)
            )
            self.ln = nn.LayerNorm(width)
        elif kind == "causal-conv":
            self.blocks = nn.ModuleList(_CausalConv(width, 3, 2**i) for i in range(layers))
        else:
            self.blocks = nn.ModuleList(Recurrent(width, width, kind) for _ in range(layers))
        self.readout = nn.Linear(width, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)
        if self.kind == "transformer":
            x = x + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        if self.kind == "transformer":
            x = self.ln(x)
        return self.readout(x)


def sequence_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy over ``(batch, time)`` positions."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class WindowSampler(BatchSampler):
    """Random windows of ``seq_len + 1`` characters of one text (inputs and next characters).

    ``x`` and ``y`` are views of every overlapping window (no copies); ``sample()`` is
    :class:`BatchSampler`'s (so the meta-trainer can replay it from the generator's state), and
    ``full()`` returns the non-overlapping windows that tile the text (at most ``max_full``,
    evenly spaced), the language model's "whole set".
    """

    def __init__(
        self,
        text: Tensor,
        seq_len: int,
        batch_size: int | None,
        generator: torch.Generator,
        max_full: int | None = 4096,
    ) -> None:
        if text.dim() != 1 or text.numel() < seq_len + 2:
            raise ValueError(f"A text of {text.numel()} ids is too short for windows of {seq_len}")
        windows = text.unfold(0, seq_len + 1, 1)
        super().__init__(windows[:, :-1], windows[:, 1:], batch_size, generator)
        self.seq_len = seq_len
        idx = torch.arange(0, len(windows), seq_len)
        if max_full is not None and len(idx) > max_full:
            idx = idx[torch.linspace(0, len(idx) - 1, max_full).round().long()]
        self._full = idx

    def full(self) -> Batch:
        return self.x[self._full], self.y[self._full]


class CharLMFamily(TaskFamily):
    """Character language models on one part of :func:`learned_opt.corpus.load_corpus`.

    The part's text (whole topics) is cut at the boundary between groups of topics nearest to
    ``1 - heldout_fraction`` of its length (no text on both sides): the model trains on the
    first piece and is evaluated on the second.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (the corpus's parts).
        kinds, widths, layers, heads, seq_lens, batch_sizes: the choices (uniform).
        heldout_fraction: the share of the part's text held out.
        test_batch_size: held-out windows per ``test.sample()``.
    """

    name = "char-lm"

    def __init__(
        self,
        split: str = "train",
        kinds: Sequence[str] = ("lstm",),
        widths: Sequence[int] = (32, 64),
        layers: Sequence[int] = (1,),
        heads: Sequence[int] = (2,),
        seq_lens: Sequence[int] = (32,),
        batch_sizes: Sequence[int] = (16, 32),
        heldout_fraction: float = 0.1,
        test_batch_size: int | None = 64,
    ) -> None:
        if split not in ("train", "val", "test"):
            raise ValueError(f"Unknown corpus split {split!r}")
        if not 0 < heldout_fraction < 1:
            raise ValueError(f"Invalid heldout_fraction: {heldout_fraction}")
        self.split = split
        self.kinds = _choices("kinds", kinds)
        if any(k not in _LM_KINDS for k in self.kinds):
            raise ValueError(f"Unknown kinds {self.kinds}; expected among {_LM_KINDS}")
        self.widths = positive_sizes("widths", _choices("widths", widths))
        self.layers = tuple(int(n) for n in _choices("layers", layers))
        self.heads = tuple(int(h) for h in _choices("heads", heads))
        check_heads(self.kinds, self.widths, self.heads)
        self.seq_lens = positive_sizes("seq_lens", _choices("seq_lens", seq_lens))
        self.batch_sizes = positive_sizes("batch_sizes", _choices("batch_sizes", batch_sizes))
        self.heldout_fraction = float(heldout_fraction)
        self.test_batch_size = check_test_batch_size(test_batch_size)

    def texts(self) -> tuple[Tensor, Tensor, int]:
        """``(training text, held-out text, vocabulary size)``."""
        from ..corpus import load_corpus

        corpus = load_corpus()
        text = corpus.splits[self.split]
        target = len(text) * (1 - self.heldout_fraction)
        cut = min(corpus.boundaries[self.split][1:] or [int(target)], key=lambda b: abs(b - target))
        return text[:cut], text[cut:], corpus.vocab_size

    def sample(self, generator: torch.Generator) -> Task:
        kind = _choice(self.kinds, generator)
        width = _choice(self.widths, generator)
        layers = _choice(self.layers, generator)
        heads = _choice(self.heads, generator)
        seq_len = _choice(self.seq_lens, generator)
        batch_size = _choice(self.batch_sizes, generator)
        seed = int(torch.randint(2**62, (1,), generator=generator))
        train_text, held_text, vocab = self.texts()
        model = CharLM(vocab, kind, width, layers, heads, seq_len)
        train = WindowSampler(train_text, seq_len, batch_size, torch.Generator().manual_seed(seed))
        test = WindowSampler(
            held_text, seq_len, self.test_batch_size, torch.Generator().manual_seed(seed + 1)
        )
        shape = f"{kind}({width}x{layers}" + (f",h{heads}" if kind == "transformer" else "")
        return Task(
            f"corpus-{self.split}-{shape},T={seq_len},bs={batch_size})",
            model,
            sequence_cross_entropy,
            lambda gen: init_model(model, gen),
            train,
            test,
        )

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "split": self.split,
            "kinds": list(self.kinds),
            "widths": list(self.widths),
            "layers": list(self.layers),
            "heads": list(self.heads),
            "seq_lens": list(self.seq_lens),
            "batch_sizes": list(self.batch_sizes),
            "heldout_fraction": self.heldout_fraction,
            "test_batch_size": self.test_batch_size,
        }
