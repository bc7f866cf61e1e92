"""An offline English text corpus for character language models (no network access).

Every CPython installation ships the text of the Python reference manual's topics
(``pydoc_data.topics``: about 465,000 characters of English prose with code examples, 79
topics, about 100 distinct characters). It is real text, the same on every machine with the same
Python, and needs no download. Topics are split into train / validation / test parts whole (never
a topic across parts), so held-out text is text the model never saw.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

__all__ = ["CharCorpus", "load_corpus"]

_SPLITS = ("train", "val", "test")


class CharCorpus:
    """A character-level corpus: ``vocab`` (sorted characters) and one int64 tensor of character
    ids per split (``splits["train"]``, ``["val"]``, ``["test"]``)."""

    def __init__(self, vocab: str, splits: dict[str, Tensor], digest: str) -> None:
        self.vocab = vocab
        self.splits = splits
        #: SHA-256 of the whole text: records which text a result was measured on.
        self.digest = digest

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def decode(self, ids: Tensor) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    def batch(
        self, split: str, batch_size: int, seq_len: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Random windows of ``seq_len + 1`` characters: inputs ``(B, T)`` and next-character
        targets ``(B, T)``.

        Raises:
            ValueError: unknown split, or windows longer than the split.
        """
        if split not in self.splits:
            raise ValueError(f"Unknown split {split!r}; expected one of {_SPLITS}")
        data = self.splits[split]
        if seq_len + 1 > data.numel():
            raise ValueError(f"seq_len {seq_len} is longer than the {split!r} text")
        starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)
        window = data[starts.unsqueeze(1) + torch.arange(seq_len + 1)]
        return window[:, :-1], window[:, 1:]


_CACHE: dict[tuple[float, float], CharCorpus] = {}


def load_corpus(val_fraction: float = 0.1, test_fraction: float = 0.1) -> CharCorpus:
    """The Python reference manual's topics as a character corpus.

    Topics are assigned to parts by a hash of their name (a fixed assignment, independent of
    the order of the dictionary), about ``val_fraction`` and ``test_fraction`` of the characters
    to validation and test.

    Raises:
        ValueError: fractions outside (0, 1) or adding up to 1 or more.
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"Invalid fractions: val {val_fraction}, test {test_fraction}")
    key = (val_fraction, test_fraction)
    if key in _CACHE:
        return _CACHE[key]
    from pydoc_data.topics import topics

    names = sorted(topics, key=lambda n: hashlib.sha256(n.encode()).hexdigest())
    text = "\n".join(topics[n] for n in sorted(topics))
    total = len(text)
    parts: dict[str, list[str]] = {s: [] for s in _SPLITS}
    filled = {"val": 0, "test": 0}
    for name in names:
        body = topics[name] + "\n"
        if filled["test"] < test_fraction * total:
            part = "test"
        elif filled["val"] < val_fraction * total:
            part = "val"
        else:
            part = "train"
        if part in filled:
            filled[part] += len(body)
        parts[part].append(body)
    vocab = "".join(sorted(set(text) | {"\n"}))
    index = {c: i for i, c in enumerate(vocab)}
    splits = {
        s: torch.tensor([index[c] for c in "".join(parts[s])], dtype=torch.int64) for s in _SPLITS
    }
    corpus = CharCorpus(vocab, splits, hashlib.sha256(text.encode()).hexdigest())
    _CACHE[key] = corpus
    return corpus
