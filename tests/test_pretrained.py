"""Shipped weights are products: each loads, and says how it was made and what it reached."""

from __future__ import annotations

import pytest
import torch

from learned_opt import GeneralLSTMRule, LSTMOptimizer, LSTMRule, load_rule, pretrained
from learned_opt.rules import ScheduledRule


@pytest.mark.parametrize("name", pretrained.available())
def test_shipped_weights_load_and_carry_provenance(name: str) -> None:
    rule, meta = load_rule(pretrained.path(name))
    if isinstance(rule, ScheduledRule):  # a schedule around one of them, read when told
        assert rule.unknown_horizon == "base"  # without the horizon: the base rule's steps
        rule = rule.base
    assert isinstance(rule, (LSTMRule, GeneralLSTMRule))
    assert all(torch.isfinite(p).all() for p in rule.parameters())
    for key in ("command", "commit", "config", "budget", "figures"):
        assert key in meta, key
    assert meta["command"].startswith("learned-opt meta-train")
    assert pretrained.metadata(name) == meta  # the .json beside the weights says the same


def test_default_is_shipped() -> None:
    assert pretrained.DEFAULT in pretrained.available()
    opt = LSTMOptimizer([torch.nn.Parameter(torch.ones(3))])
    assert opt.metadata == pretrained.metadata(pretrained.DEFAULT)


def test_default_is_the_general_rule_and_the_paper_lstm_stays_by_name() -> None:
    params = [torch.nn.Parameter(torch.ones(3))]
    default = LSTMOptimizer(params)
    assert isinstance(default.rule.unwrapped, GeneralLSTMRule)
    # meta-trained, not a zero read-out
    assert torch.count_nonzero(default.rule.unwrapped.out_weight) > 0
    paper = LSTMOptimizer(params, weights="paper-mnist")
    assert isinstance(paper.rule, LSTMRule)
    assert paper.metadata == pretrained.metadata("paper-mnist")
    # the default was shipped with its sealed figures at both horizons, no worse than those of
    # the former default it derives from, which stays by name
    meta = pretrained.metadata(pretrained.DEFAULT)
    former = meta["derived_from"]["weights"]
    assert former in pretrained.available() and former != pretrained.DEFAULT
    figures = meta["figures"]
    assert set(figures["by_steps"]) == {"100", "1000"}
    for entry in figures["by_steps"].values():
        assert entry["geometric_mean"] <= entry[f"replaced_{former}"]["geometric_mean"]
        assert max(entry["ratios"].values()) == entry["worst"] <= figures["worst_ratio"]
    # the first general rule's out-of-distribution figures: every ratio at most 1
    first = pretrained.metadata("general")["figures"]
    ratios = [
        r for e in first["by_steps"].values() for s in e["streams"] for r in s["ratios"].values()
    ]
    assert ratios and max(ratios) == first["worst_ratio"] <= 1.0


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match="No shipped weights"):
        pretrained.path("nope")
