"""Contract tests run on every rule, and parity of the hand-written rules with torch.optim."""

from __future__ import annotations

import pytest
import torch

from learned_opt import AdamRule, LearnedOptimizer, LSTMRule, SGDRule
from learned_opt.learners import OptimizerLearner
from learned_opt.outer import unroll
from learned_opt.rules import RULES, build_rule
from learned_opt.tasks import QuadraticFamily

RULE_FACTORIES = {
    "lstm": lambda: LSTMRule(),
    "lstm-p5": lambda: LSTMRule(preprocess_p=5.0, hidden_size=8, num_layers=1),
    "lstm-raw": lambda: LSTMRule(preprocess="none"),
    "sgd": lambda: SGDRule(lr=0.1),
    "sgd-momentum": lambda: SGDRule(lr=0.1, momentum=0.9),
    "adam": lambda: AdamRule(lr=0.1),
}


@pytest.fixture(params=sorted(RULE_FACTORIES))
def any_rule(request: pytest.FixtureRequest):
    torch.manual_seed(0)
    return RULE_FACTORIES[request.param]()


def test_rule_is_pure_and_shape_preserving(any_rule) -> None:
    grad = torch.randn(7)
    state = any_rule.init_state(7, like=grad)
    before = {k: v.clone() for k, v in state.items()}
    update, new_state = any_rule(grad, state)
    assert update.shape == (7,)
    assert set(new_state) == set(state)
    for k, v in state.items():  # no in-place writes
        assert torch.equal(v, before[k])
        dim = any_rule.coord_dim(k)
        if dim is not None:
            assert new_state[k].shape[dim] == 7


def test_rule_is_coordinatewise(any_rule) -> None:
    """One call on the concatenation equals separate calls on the pieces."""
    a, b = torch.randn(5), torch.randn(3)
    upd, _ = any_rule(torch.cat([a, b]), any_rule.init_state(8, like=a))
    ua, _ = any_rule(a, any_rule.init_state(5, like=a))
    ub, _ = any_rule(b, any_rule.init_state(3, like=b))
    torch.testing.assert_close(upd, torch.cat([ua, ub]))


def test_rule_config_round_trip(any_rule) -> None:
    clone = build_rule(any_rule.kind, any_rule.config())
    assert clone.config() == any_rule.config()
    assert any_rule.kind in RULES


def test_hand_rules_go_downhill() -> None:
    for rule in (SGDRule(lr=0.1), AdamRule(lr=0.1)):
        grad = torch.tensor([1.0, -2.0])
        update, _ = rule(grad, rule.init_state(2, like=grad))
        assert (update * grad < 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adam_rule_in_drop_in_matches_torch_adam(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    ref = [
        torch.randn(4, 3, dtype=dtype, requires_grad=True),
        torch.randn(5, dtype=dtype, requires_grad=True),
    ]
    mine = [p.detach().clone().requires_grad_(True) for p in ref]
    opt_ref = torch.optim.Adam(ref, lr=3e-2, betas=(0.8, 0.99), eps=1e-6, foreach=False)
    opt_mine = LearnedOptimizer(mine, AdamRule(lr=3e-2, betas=(0.8, 0.99), eps=1e-6))
    for step in range(25):
        for params, opt in ((ref, opt_ref), (mine, opt_mine)):
            opt.zero_grad()
            loss = sum(((p - 1) ** 2 * (1 + step % 3)).sum() + p.sin().sum() for p in params)
            loss.backward()
            opt.step()
    for a, b in zip(ref, mine):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_sgd_rule_in_drop_in_matches_torch_sgd() -> None:
    torch.manual_seed(0)
    ref = [torch.randn(6, requires_grad=True)]
    mine = [ref[0].detach().clone().requires_grad_(True)]
    opt_ref = torch.optim.SGD(ref, lr=0.05, momentum=0.9)
    opt_mine = LearnedOptimizer(mine, SGDRule(lr=0.05, momentum=0.9))
    for _ in range(10):
        for params, opt in ((ref, opt_ref), (mine, opt_mine)):
            opt.zero_grad()
            (params[0] ** 4).sum().backward()
            opt.step()
    torch.testing.assert_close(ref[0], mine[0], atol=1e-6, rtol=0)


def test_lstm_rule_validates_arguments() -> None:
    with pytest.raises(ValueError, match="preprocess"):
        LSTMRule(preprocess="bogus")
    with pytest.raises(ValueError, match="hidden_size"):
        LSTMRule(hidden_size=0)
    with pytest.raises(ValueError, match="Unknown rule kind"):
        build_rule("nope")


def test_lstm_rule_paper_defaults() -> None:
    r = LSTMRule()
    assert (r.hidden_size, r.num_layers, r.preprocess_p, r.output_scale) == (20, 2, 10.0, 0.1)
    n = sum(p.numel() for p in r.parameters())
    # 2 layers of 4x20 gates (inputs 2 then 20, plus recurrence and bias) and the read-out.
    assert n == (2 * 80 + 20 * 80 + 80) + (20 * 80 + 20 * 80 + 80) + 21


def test_meta_gradient_gradcheck_two_step_unroll() -> None:
    """The meta-gradient of a two-step second-order unroll matches finite differences."""
    torch.manual_seed(0)
    rule = LSTMRule(hidden_size=3, num_layers=1).double()
    family = QuadraticFamily(dim=3, dtype=torch.float64)
    task = family.sample(torch.Generator().manual_seed(0))
    names = [n for n, _ in rule.named_parameters()]

    def meta_loss(*weights: torch.Tensor) -> torch.Tensor:
        rule_copy = LSTMRule(hidden_size=3, num_layers=1).double()
        params = dict(zip(names, weights))
        learner = OptimizerLearner(rule_copy, second_order=True)
        with torch.nn.utils.stateless._reparametrize_module(rule_copy, params):
            (window,) = list(
                unroll(learner, task, torch.Generator().manual_seed(1), horizon=2, truncation=2)
            )
            return window.meta_loss

    weights = tuple(p.detach().clone().requires_grad_(True) for p in rule.parameters())
    assert torch.autograd.gradcheck(meta_loss, weights, eps=1e-6, atol=1e-5)
