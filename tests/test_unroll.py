from __future__ import annotations

import math

import pytest
import torch

from learned_opt import LSTMRule, OptimizerLearner
from learned_opt.outer import run_inner, unroll
from learned_opt.rules import SGDRule
from learned_opt.tasks import make_family


def _meta_grad(rule: LSTMRule, *, second_order: bool, objective: str = "train") -> torch.Tensor:
    task = make_family("quadratic").sample(torch.Generator().manual_seed(0))
    learner = OptimizerLearner(rule, second_order=second_order)
    rule.zero_grad()
    for w in unroll(
        learner,
        task,
        torch.Generator().manual_seed(1),
        horizon=6,
        truncation=3,
        objective=objective,
    ):
        w.meta_loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in rule.parameters()])


def test_windows_cover_the_horizon_and_detach(rule: LSTMRule) -> None:
    task = make_family("quadratic").sample(torch.Generator().manual_seed(0))
    windows = list(
        unroll(
            OptimizerLearner(rule), task, torch.Generator().manual_seed(1), horizon=10, truncation=4
        )
    )
    assert [(w.start, w.end) for w in windows] == [(0, 4), (4, 8), (8, 10)]
    assert all(w.meta_loss.requires_grad for w in windows)
    assert [len(w.train_losses) for w in windows] == [4, 4, 2]


def test_first_and_second_order_meta_gradients_differ(rule: LSTMRule) -> None:
    first = _meta_grad(rule, second_order=False)
    second = _meta_grad(rule, second_order=True)
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    assert first.abs().sum() > 0
    assert not torch.allclose(first, second)


def test_test_objective_reaches_theta(rule: LSTMRule) -> None:
    grad = _meta_grad(rule, second_order=False, objective="test")
    assert grad.abs().sum() > 0


def test_final_train_objective_is_the_training_loss_after_the_window() -> None:
    task = make_family("quadratic").sample(torch.Generator().manual_seed(0))
    learner = OptimizerLearner(SGDRule(lr=1e-3))
    kw = dict(horizon=3, truncation=3, objective="final-train")
    (window,) = unroll(learner, task, torch.Generator().manual_seed(1), **kw)
    # the quadratic's training set is one fixed batch: the loss at the final parameters on it
    expected = learner.evaluate(task, window.state, task.train.sample())
    torch.testing.assert_close(window.meta_loss, expected)
    assert window.meta_loss.requires_grad and window.meta_loss < window.train_losses[0]


def test_sgd_unroll_matches_hand_computation() -> None:
    task = make_family("quadratic").sample(torch.Generator().manual_seed(0))
    losses, state = run_inner(
        OptimizerLearner(SGDRule(lr=1e-3)), task, torch.Generator().manual_seed(1), 3
    )
    theta = task.init_params(torch.Generator().manual_seed(1))["theta"].clone()
    w, y = task.train.sample()
    for _ in range(3):
        theta = theta - 1e-3 * 2 * w.T @ (w @ theta - y)
    torch.testing.assert_close(state.params.detach(), theta)
    assert losses.shape == (3,) and losses[-1] < losses[0]


def test_exploding_inner_task_ends_the_unroll() -> None:
    task = make_family("quadratic").sample(torch.Generator().manual_seed(0))
    windows = list(
        unroll(
            OptimizerLearner(SGDRule(lr=10.0)),
            task,
            torch.Generator().manual_seed(1),
            horizon=50,
            truncation=5,
            max_loss_ratio=100.0,
        )
    )
    assert windows[-1].diverged
    assert sum(w.end - w.start for w in windows) < 50
    assert all(torch.isfinite(w.train_losses).all() for w in windows)


def test_invalid_arguments() -> None:
    task = make_family("quadratic").sample(torch.Generator().manual_seed(0))
    learner = OptimizerLearner(SGDRule())
    with pytest.raises(ValueError, match="objective"):
        next(unroll(learner, task, torch.Generator(), objective="val"))
    with pytest.raises(ValueError, match="horizon"):
        next(unroll(learner, task, torch.Generator(), horizon=0))


@pytest.mark.parametrize("objective", ["train", "test", "final-train"])
def test_log_meta_loss_divides_the_meta_gradient_by_the_loss(
    rule: LSTMRule, objective: str
) -> None:
    task = make_family("quadratic").sample(torch.Generator().manual_seed(0))
    learner = OptimizerLearner(rule)

    def window(log: bool) -> tuple[float, torch.Tensor]:
        rule.zero_grad()
        w = next(
            unroll(
                learner,
                task,
                torch.Generator().manual_seed(1),
                horizon=3,
                truncation=3,
                objective=objective,
                log_meta_loss=log,
            )
        )
        w.meta_loss.backward()
        return float(w.meta_loss.detach()), torch.cat(
            [p.grad.reshape(-1) for p in rule.parameters()]
        )

    plain, plain_grad = window(False)
    logged, log_grad = window(True)
    assert logged == pytest.approx(math.log(plain), rel=1e-5)
    torch.testing.assert_close(log_grad, plain_grad / plain, rtol=1e-4, atol=1e-8)
