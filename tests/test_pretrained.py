"""Shipped weights are products: each loads, and says how it was made and what it reached."""

from __future__ import annotations

import pytest
import torch

from learned_opt import LSTMOptimizer, LSTMRule, load_rule, pretrained


@pytest.mark.parametrize("name", pretrained.available())
def test_shipped_weights_load_and_carry_provenance(name: str) -> None:
    rule, meta = load_rule(pretrained.path(name), expected_kind="lstm")
    assert isinstance(rule, LSTMRule)
    assert all(torch.isfinite(p).all() for p in rule.parameters())
    for key in ("command", "commit", "config", "budget", "figures"):
        assert key in meta, key
    assert meta["command"].startswith("learned-opt meta-train")
    assert pretrained.metadata(name) == meta  # the .json beside the weights says the same


def test_default_is_shipped() -> None:
    assert pretrained.DEFAULT in pretrained.available()
    opt = LSTMOptimizer([torch.nn.Parameter(torch.ones(3))])
    assert opt.metadata == pretrained.metadata(pretrained.DEFAULT)


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="No shipped weights"):
        pretrained.path("nope")
