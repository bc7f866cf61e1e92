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
