"""The offline character corpus: disjoint parts, fixed vocabulary, next-character targets."""

from __future__ import annotations

import pytest
import torch

from learned_opt.corpus import load_corpus


def test_parts_are_disjoint_nonempty_and_cover_the_text() -> None:
    corpus = load_corpus()
    sizes = {k: v.numel() for k, v in corpus.splits.items()}
    assert all(n > 40_000 for n in sizes.values()), sizes
    assert sizes["train"] > sizes["val"] and sizes["train"] > sizes["test"]
    assert 60 < corpus.vocab_size < 200
    assert all(int(v.max()) < corpus.vocab_size for v in corpus.splits.values())
    assert load_corpus() is corpus  # cached
    assert len(corpus.digest) == 64


def test_batches_are_windows_with_shifted_targets() -> None:
    corpus = load_corpus()
    x, y = corpus.batch("val", 4, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    again, _ = corpus.batch("val", 4, 32, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
    with pytest.raises(ValueError, match="Unknown split"):
        corpus.batch("holdout", 1, 4, torch.Generator())
    with pytest.raises(ValueError, match="Invalid fractions"):
        load_corpus(0.6, 0.5)


def _passages(text: str, length: int = 200) -> set[str]:
    return {text[i : i + length] for i in range(len(text) - length + 1)}


def test_no_passage_is_in_two_parts_or_on_both_sides_of_a_held_out_cut() -> None:
    """Many topics repeat others verbatim (``while`` is a section of ``compound``): they stay in
    one part, and a language model's held-out text shares no passage with its training text."""
    from learned_opt.tasks.sequence import CharLMFamily

    corpus = load_corpus()
    parts = {k: corpus.decode(v) for k, v in corpus.splits.items()}
    seen = {k: _passages(t) for k, t in parts.items()}
    assert not seen["train"] & seen["val"]
    assert not seen["train"] & seen["test"]
    assert not seen["val"] & seen["test"]
    for split in ("train", "val", "test"):
        train, held, _ = CharLMFamily(split).texts()
        assert held.numel() > 2_000
        assert not _passages(corpus.decode(train)) & _passages(corpus.decode(held))
