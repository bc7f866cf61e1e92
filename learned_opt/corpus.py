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
    """A character-level corpus: ``vocab`` (sorted characters), one int64 tensor of character
    ids per split (``splits["train"]``, ``["val"]``, ``["test"]``), and per split the offsets
    where its groups of topics start (``boundaries``: cutting a split there leaves no text on
    both sides; ``[0]`` if unknown)."""

    def __init__(
        self,
        vocab: str,
        splits: dict[str, Tensor],
        digest: str,
        boundaries: dict[str, list[int]] | None = None,
    ) -> None:
        self.vocab = vocab
        self.splits = splits
        self.boundaries = boundaries or {s: [0] for s in splits}
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


def _shared_text_groups(topics: dict[str, str], length: int = 200) -> list[list[str]]:
    """The topics in groups that share no text: topics with a common passage of ``length``
    characters are in one group (transitively). Many reference-manual topics repeat parts of
    others verbatim (``while`` is a section of ``compound``), so a split by topic alone would
    put the same text in two parts."""
    half = length // 2  # a common passage of `length` holds an aligned `half` piece of each
    owner: dict[str, str] = {}
    parent = {n: n for n in topics}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for name in sorted(topics):
        body = topics[name]
        for i in range(0, len(body) - half + 1, half):
            owner.setdefault(body[i : i + half], name)
    for name in sorted(topics):
        body = topics[name]
        for i in range(len(body) - half + 1):
            other = owner.get(body[i : i + half])
            if other is not None and other != name:
                parent[root(name)] = root(other)
    groups: dict[str, list[str]] = {}
    for name in sorted(topics):
        groups.setdefault(root(name), []).append(name)
    return list(groups.values())


def load_corpus(val_fraction: float = 0.1, test_fraction: float = 0.1) -> CharCorpus:
    """The Python reference manual's topics as a character corpus.

    Topics that share text are kept together (:func:`_shared_text_groups`), and the groups are
    assigned to parts in the order of a hash of their names (a fixed assignment, independent of
    the order of the dictionary): test, then validation, until each holds about
    ``test_fraction`` / ``val_fraction`` of the characters (a group that would overfill a part
    by more than half goes on to the next), the rest to train; in each part the largest groups
    come first. No passage of 200 characters is in two parts (tested).

    Raises:
        ValueError: fractions outside (0, 1) or adding up to 1 or more.
    """
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"Invalid fractions: val {val_fraction}, test {test_fraction}")
    key = (val_fraction, test_fraction)
    if key in _CACHE:
        return _CACHE[key]
    from pydoc_data.topics import topics

    text = "\n".join(topics[n] for n in sorted(topics))
    total = len(text)

    def digest(names: list[str]) -> str:
        return hashlib.sha256(" ".join(names).encode()).hexdigest()

    def size(names: list[str]) -> int:
        return sum(len(topics[n]) + 1 for n in names)

    groups = sorted(_shared_text_groups(topics), key=digest)
    targets = {"test": test_fraction * total, "val": val_fraction * total}
    chosen: dict[str, list[list[str]]] = {s: [] for s in _SPLITS}
    filled = {"val": 0, "test": 0}
    for names in groups:
        part = next(
            (p for p in ("test", "val")
             if filled[p] < targets[p] and filled[p] + size(names) <= 1.5 * targets[p]),
            "train",
        )  # fmt: skip
        if part in filled:
            filled[part] += size(names)
        chosen[part].append(names)
    # In each part the largest groups first: the small ones at its end give held-out cuts
    # (CharLMFamily) close to any fraction.
    parts: dict[str, str] = {}
    boundaries: dict[str, list[int]] = {}
    for part, part_groups in chosen.items():
        bodies, boundaries[part], at = [], [], 0
        for names in sorted(part_groups, key=lambda g: -size(g)):
            boundaries[part].append(at)
            bodies += [topics[n] + "\n" for n in names]
            at += size(names)
        parts[part] = "".join(bodies)
    vocab = "".join(sorted(set(text) | {"\n"}))
    index = {c: i for i, c in enumerate(vocab)}
    splits = {s: torch.tensor([index[c] for c in parts[s]], dtype=torch.int64) for s in _SPLITS}
    corpus = CharCorpus(vocab, splits, hashlib.sha256(text.encode()).hexdigest(), boundaries)
    _CACHE[key] = corpus
    return corpus
