"""The learned turn of each tensor's direction at its own root mean square
(``direction_correction=True``)."""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

from learned_opt import LearnedOptimizer, load_rule, pretrained
from learned_opt.rules import LSTMCorrectedAdamRule, ScheduledRule, build_rule

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(8, 5), (5,), (3, 4, 2), (7,), (0, 3)]


def _turning_rule(scale: float, **options) -> LSTMCorrectedAdamRule:
    rule = LSTMCorrectedAdamRule(direction_correction=True, **options)
    gen = torch.Generator().manual_seed(3)
    rule.reset_parameters(gen)  # not the global generator's: the same rule in any test order
    with torch.no_grad():
        rule.out_weight.normal_(0, 0.5, generator=gen)
        rule.correction_weight.normal_(0, scale, generator=gen)
        rule.correction_bias.fill_(0.3 * scale)
    return rule


def _flat_run(rule: LSTMCorrectedAdamRule, steps: int = 6) -> list[torch.Tensor]:
    numels = [math.prod(s) for s in SHAPES]
    n = sum(numels)
    shapes = SHAPES if rule.orthogonal else None
    state = rule.init_state(n, like=torch.zeros(n), numels=numels, shapes=shapes)
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(steps):
        update, state = rule(torch.randn(n, generator=gen), state)
        out.append(update)
    return out


@pytest.mark.parametrize("options", [{}, {"orthogonal": True, "orthogonal_rms": True}])
def test_at_zero_the_rule_is_unchanged_step_for_step(options) -> None:
    """The correction's weights start at zero, and then every update is the rule's without the
    option, bit for bit (a flat vector of several tensors, Adam's and Muon's directions)."""
    turned = LSTMCorrectedAdamRule(direction_correction=True, **options)
    assert not turned.correction_weight.any() and not turned.correction_bias.any()
    plain = turned.variant(direction_correction=False)
    with torch.no_grad():  # a non-zero LSTM read-out: the correction turns its output
        for rule in (turned, plain):
            rule.out_weight.fill_(0.3)
    for got, want in zip(_flat_run(turned), _flat_run(plain)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("options", [{}, {"orthogonal": True, "orthogonal_rms": True}])
def test_the_correction_turns_each_tensor_but_keeps_its_step_length(options) -> None:
    """A non-zero correction changes the direction of every (non-empty) tensor, and each tensor's
    update keeps the norm of the uncorrected rule's, at every step, whatever the adapted step
    size (the uncorrected rule run on the same gradients from the same state)."""
    rule = _turning_rule(5.0, **options)
    numels = [math.prod(s) for s in SHAPES]
    n = sum(numels)
    shapes = SHAPES if rule.orthogonal else None
    state = rule.init_state(n, like=torch.zeros(n), numels=numels, shapes=shapes)
    plain = rule.variant(direction_correction=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        g = torch.randn(n, generator=gen)
        want, _ = plain(g, state)
        got, state = rule(g, state)
        for a, b, k in zip(got.split(numels), want.split(numels), numels):
            if k == 0:
                continue
            torch.testing.assert_close(a.norm(), b.norm(), rtol=1e-5, atol=0)
            assert float(torch.cosine_similarity(a.detach(), b.detach(), dim=0)) < 0.999


def test_the_drop_in_step_matches_the_forward_and_the_flat_vector() -> None:
    """The drop-in optimizer (one state per tensor, the forward's path) gives the forward's
    updates, and per tensor those of the flat vector (the meta-learner's)."""
    rule = _turning_rule(0.5, orthogonal=True, orthogonal_rms=True)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in SHAPES]
    opt = LearnedOptimizer(params, rule, lr=0.1)
    numels = [math.prod(s) for s in SHAPES]
    n = sum(numels)
    flat = rule.init_state(n, like=torch.zeros(n), numels=numels, shapes=SHAPES)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        g = torch.randn(n, generator=gen)
        before = [p.detach().clone() for p in params]
        for p, gi in zip(params, g.split(numels)):
            p.grad = gi.reshape(p.shape).clone()
        opt.step()
        want, flat = rule(g, flat)
        got = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(params, before)])
        torch.testing.assert_close(got, 0.1 * want, rtol=1e-5, atol=1e-7)


def test_the_correction_needs_the_nominal_direction_and_stays_learnable() -> None:
    with pytest.raises(ValueError, match="direction_correction"):
        LSTMCorrectedAdamRule(direction_correction=True, nominal=False)
    base = LSTMCorrectedAdamRule(direction_correction=True, learn_lstm=False)
    rule = ScheduledRule(base.kind, base.config(), learn_schedule=False)
    learnable = [n for n, p in rule.named_parameters() if p.requires_grad]
    assert learnable == ["base.correction_weight", "base.correction_bias"]


def test_the_ablations_zero_the_correction_with_the_learned_outputs_and_alone() -> None:
    """``zero_readout`` (the sealed benchmark's ``learned-zeroed``) zeroes the correction with
    the rest of the learned outputs; the ablations' ``direction correction zeroed`` only it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sealed_optimizers import zero_readout

    base, _ = load_rule(pretrained.path("general-v7"))
    config = base.config()
    config["base_config"] = {**config["base_config"], "direction_correction": True}
    rule = build_rule(base.kind, config)
    rule.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        rule.base.correction_weight.fill_(0.2)
        rule.base.correction_bias.fill_(0.1)
    zeroed = zero_readout(rule).base
    assert not zeroed.correction_weight.any() and not zeroed.correction_bias.any()
    assert not zeroed.controller_linear.any()
    found = runpy.run_path(str(ROOT / "benchmarks/ablations.py"))["variants"](rule)
    straight, schedule = found["direction correction zeroed"]
    assert schedule is None
    assert not straight.base.correction_weight.any() and not straight.base.correction_bias.any()
    torch.testing.assert_close(straight.base.controller_linear, rule.base.controller_linear)
    assert rule.base.correction_weight.eq(0.2).all()  # the rule itself untouched
    plain = runpy.run_path(str(ROOT / "benchmarks/ablations.py"))["variants"](base)
    assert "direction correction zeroed" not in plain
