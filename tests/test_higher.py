"""The learned rule inside higher.innerloop_ctx."""

from __future__ import annotations

import higher
import pytest
import torch
from torch import nn

from learned_opt import (
    DifferentiableLearnedOptimizer,
    LSTMOptimizer,
    LSTMRule,
    NonFiniteGradientError,
)


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2))
    x = torch.randn(8, 3)
    y = torch.randint(2, (8,))
    return model, x, y


def test_higher_follows_the_drop_in_trajectory(rule: LSTMRule) -> None:
    model, x, y = _setup()
    reference = [p.detach().clone() for p in model.parameters()]
    opt = LSTMOptimizer(model.parameters(), weights=rule)
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
        assert isinstance(diffopt, DifferentiableLearnedOptimizer)
        for _ in range(5):
            diffopt.step(nn.functional.cross_entropy(fmodel(x), y))
        fast = [p.detach().clone() for p in fmodel.parameters()]

    for p, r in zip(model.parameters(), reference):  # higher left the model alone
        assert torch.equal(p, r)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for a, b in zip(fast, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-5)


def test_meta_gradient_reaches_a_trainable_rule(rule: LSTMRule) -> None:
    model, x, y = _setup()
    opt = LSTMOptimizer(model.parameters(), weights=rule)
    trainable = LSTMRule()
    trainable.load_state_dict(rule.state_dict())
    with higher.innerloop_ctx(model, opt) as (fmodel, _):
        diffopt = DifferentiableLearnedOptimizer(
            opt, model.parameters(), fmodel=fmodel, rule=trainable
        )
        for _ in range(3):
            diffopt.step(nn.functional.cross_entropy(fmodel(x), y))
        nn.functional.cross_entropy(fmodel(x), y).backward()
    grads = [p.grad for p in trainable.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def _higher_then_drop_in(model, opt, x, y, steps: int) -> list[torch.Tensor]:
    """``steps`` differentiable steps of ``opt`` through ``higher`` (the model left as it is),
    then as many drop-in steps on the model itself; returns the differentiable run's weights."""
    with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(nn.functional.cross_entropy(fmodel(x), y))
        fast = [p.detach().clone() for p in fmodel.parameters()]
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return fast


@pytest.mark.parametrize(
    "options",
    [
        {},  # the default weights: Muon's direction for matrices, the learned controller
        {"total_steps": 5},  # told the run's length: the warm-up and decay
        {"weight_decay": 0.1, "maximize": True},
        {"orthogonal": False},
        {"state_dtype": torch.bfloat16},  # the state rounded as the drop-in's stores it
        {"weights": "general-v7-lean", "total_steps": 5},
    ],
)
def test_higher_follows_the_default_optimizers_trajectory(options: dict) -> None:
    """With the shipped default weights and every option that changes a step, the differentiable
    step takes the drop-in optimizer's: the matrices' shape, the horizon, the weight decay and
    the sign reach it too, and its state is stored as the drop-in's."""
    model, x, y = _setup()
    reference = [p.detach().clone() for p in model.parameters()]
    fast = _higher_then_drop_in(model, LSTMOptimizer(model.parameters(), **options), x, y, 5)
    for a, b in zip(fast, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-5)
    assert not all(torch.equal(a, r) for a, r in zip(fast, reference))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_higher_steps_half_precision_parameters_as_the_drop_in_optimizer(dtype) -> None:
    """float16 parameters step in float32 (as the drop-in's) and stay in their dtype."""
    model, x, y = _setup()
    model = model.to(dtype)
    x = x.to(dtype)
    fast = _higher_then_drop_in(model, LSTMOptimizer(model.parameters()), x, y, 3)
    for a, b in zip(fast, model.parameters()):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b.detach())


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_higher_keeps_the_optimizers_nonfinite_policy(nonfinite: str) -> None:
    """A NaN gradient on the weight (not the bias) under ``higher``: as the drop-in optimizer,
    "skip" leaves the weight and its state as they were and steps the bias, with a warning;
    "raise" raises before anything changes. (It used to write NaN into the weights.)"""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = LSTMOptimizer(model.parameters(), nonfinite=nonfinite)
    x = torch.ones(2, 3)
    with higher.innerloop_ctx(model, opt) as (fmodel, diffopt):
        diffopt.step(fmodel(x).pow(2).sum())  # a first, finite step: state exists
        weight, bias = (t.detach().clone() for t in fmodel.parameters())
        states = [{k: v.clone() for k, v in diffopt.state[0][i].items()} for i in range(2)]
        loss = (fmodel.weight * float("nan")).sum() + fmodel.bias.sum()
        grads = torch.autograd.grad(loss, list(fmodel.parameters()), retain_graph=True)
        assert not torch.isfinite(grads[0]).all() and torch.isfinite(grads[1]).all()
        if nonfinite == "raise":
            with pytest.raises(NonFiniteGradientError, match="no parameter was changed"):
                diffopt.step(loss)
        else:
            with pytest.warns(RuntimeWarning, match="skipped the update of 1 parameter"):
                diffopt.step(loss)
        assert torch.equal(fmodel.weight, weight)
        assert torch.equal(fmodel.bias, bias) == (nonfinite == "raise")
        for i in range(2):
            state = diffopt.state[0][i]
            unchanged = all(torch.equal(v, states[i][k]) for k, v in state.items())
            assert unchanged == (i == 0 or nonfinite == "raise"), i
