"""The learned gain on LSTMCorrectedAdamRule's step-size adaptation (``controller_hidden``), its
drift (``controller_drift``) and the adaptation learned whole (``lr_adapt_learned``): zero at
initialization (the hand-designed rule, or no adaptation, step for step, in the unroll and the
drop-in optimizer), their effect on the log step size, the fixed-LSTM option, checkpoints and
PES."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from learned_opt import LearnedOptimizer, load_rule, pretrained, save_rule
from learned_opt.learners import OptimizerLearner
from learned_opt.outer.estimators import build_estimator
from learned_opt.outer.estimators.base import meta_parameters
from learned_opt.outer.unroll import UnrollSpec
from learned_opt.rules import LSTMCorrectedAdamConfig, LSTMCorrectedAdamRule
from learned_opt.tasks import RandomMLPFamily

GAIN = {"controller_hidden": 4}


def _shipped(**options) -> LSTMCorrectedAdamRule:
    """The shipped rule with ``options``; the weights they add are drawn from a fixed seed (a
    draw from the global generator made the unroll-against-drop-in checks depend on the tests
    run before them, and some draws amplify the last bits of float32 a thousandfold)."""
    base, _ = load_rule(pretrained.path("general"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return base.variant(**options)


def _train(rule, steps: int = 30) -> tuple[list[torch.Tensor], dict]:
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.randn(40, 30, generator=gen).requires_grad_(),
        torch.zeros(40, requires_grad=True),
    ]
    x, y = torch.randn(64, 30, generator=gen), torch.randn(64, 40, generator=gen)
    opt = LearnedOptimizer(params, rule)
    for _ in range(steps):
        opt.zero_grad()
        ((torch.tanh(x @ params[0].T + params[1]) - y) ** 2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in params], opt.state[params[0]]


def test_zero_gain_is_the_shipped_rule_step_for_step() -> None:
    shipped, _ = _train(_shipped())
    gained, state = _train(_shipped(**GAIN))
    assert all(torch.equal(a, b) for a, b in zip(shipped, gained))
    assert state["cos_avg"].shape == (1,)


@pytest.mark.parametrize("gain", [-1.0, 1.0])
def test_the_gain_scales_each_change_of_the_log_step(gain: float) -> None:
    """The cosines do not depend on the step size (the previous direction is stored before it
    scales the step), so on the same gradients a constant output delta makes the log step size
    e^delta times the hand-designed one (within the bound), at every step."""
    plain, rule = _shipped(), _shipped(**GAIN)
    with torch.no_grad():
        rule.controller_b2.fill_(gain)
    delta = 2.0 * math.tanh(gain / 2.0)  # B tanh(o / B), B = 2
    gen = torch.Generator().manual_seed(1)
    s_plain = plain.init_state(50, like=torch.zeros(1))
    s_gain = rule.init_state(50, like=torch.zeros(1))
    for step in range(8):
        g = torch.randn(50, generator=gen) + (0.5 if step < 5 else -2.0)
        _, s_plain = plain(g, s_plain)
        _, s_gain = rule(g, s_gain)
        assert s_gain["log_step"].shape == (1,)
        torch.testing.assert_close(s_gain["log_step"], math.exp(delta) * s_plain["log_step"])
    assert float(s_plain["log_step"].detach()) != 0.0


@pytest.mark.parametrize("drift", [-0.4, 0.4])
def test_the_drift_adds_to_each_change_of_the_log_step(drift: float) -> None:
    """With the gain at 1 and a constant drift output d, each change of the log step size is
    the hand-designed one plus kappa_t d (kappa_t: the warmed-up adaptation rate)."""
    plain, rule = _shipped(), _shipped(**GAIN, controller_drift=0.5)
    with torch.no_grad():
        rule.controller_drift_b.fill_(math.atanh(drift / 0.5))
    cfg = plain.settings
    gen = torch.Generator().manual_seed(1)
    s_plain = plain.init_state(50, like=torch.zeros(1))
    s_drift = rule.init_state(50, like=torch.zeros(1))
    for t in range(1, 9):
        g = torch.randn(50, generator=gen) + (0.5 if t < 6 else -2.0)
        before = s_drift["log_step"] - s_plain["log_step"]
        _, s_plain = plain(g, s_plain)
        _, s_drift = rule(g, s_drift)
        kappa = cfg.lr_adapt * (1 + cfg.lr_adapt_warmup * math.exp(-t / cfg.lr_adapt_warmup_steps))
        after = s_drift["log_step"] - s_plain["log_step"]
        torch.testing.assert_close(after - before, torch.tensor([kappa * drift]))


def test_zero_drift_is_the_gain_rule_step_for_step() -> None:
    rule = _nonzero_gain()
    gained, _ = _train(rule)
    drifted, state = _train(rule.variant(controller_drift=0.5))
    assert all(torch.equal(a, b) for a, b in zip(gained, drifted))
    assert state["log_step"].shape == (1,)


def _nonzero_gain(**options) -> LSTMCorrectedAdamRule:
    rule = _shipped(**GAIN, **options)
    with torch.no_grad():
        rule.controller_w2.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(2))
        rule.controller_b2.fill_(0.3)
        if rule.settings.controller_drift > 0:
            rule.controller_drift_w.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(3))
            rule.controller_drift_b.fill_(-0.2)
    return rule


@pytest.mark.parametrize("options", [{}, {"controller_drift": 0.5}], ids=["gain", "drift"])
def test_unroll_and_drop_in_optimizer_agree_with_a_controller(options: dict) -> None:
    """The unroll's flat vector (several tensors) and the drop-in optimizer (one tensor per
    call, the fused kernel) give the same run with a non-zero controller."""
    family, flat = _unroll_matches_drop_in(_nonzero_gain(**options))
    assert not torch.allclose(flat, _drop_in_run(family, _shipped(), 15))  # the gain acts


def _unroll_matches_drop_in(rule, steps: int = 15):
    """Asserts that the unroll's flat vector and the drop-in optimizer give the same run of
    ``rule``; returns the family and the drop-in run's parameters."""
    family = RandomMLPFamily("digits", (8,), (1,), ("tanh",), (16,))
    task = family.sample(torch.Generator().manual_seed(3))
    learner = OptimizerLearner(rule)
    state = learner.init_state(task, torch.Generator().manual_seed(4))
    for _ in range(steps):
        state, _ = learner.step(task, state, task.train.sample(), differentiable=False)
    flat = _drop_in_run(family, rule, steps)
    # The two sum each tensor's statistics in different orders (the flat vector's index_add,
    # the fused kernel's blocks). With the seeded controllers here the runs are well
    # conditioned: a relative 1e-5 error in every gradient moves the end by under 1e-5.
    torch.testing.assert_close(flat, state.params, rtol=1e-4, atol=1e-5)
    return family, flat


def _drop_in_run(family, rule, steps: int) -> torch.Tensor:
    task = family.sample(torch.Generator().manual_seed(3))
    leaves = [
        v.clone().requires_grad_(True)
        for v in task.init_params(torch.Generator().manual_seed(4)).values()
    ]
    names = list(task.init_params(torch.Generator().manual_seed(4)))
    opt = LearnedOptimizer(leaves, rule)
    for _ in range(steps):
        opt.zero_grad()
        task.loss(dict(zip(names, leaves)), task.train.sample()).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in leaves])


def test_fixed_lstm_leaves_only_the_controller_to_meta_train(tmp_path: Path) -> None:
    rule = _shipped(**GAIN, learn_lstm=False)
    learner = OptimizerLearner(rule)
    names = [n for n, p in learner.named_parameters() if p.requires_grad]
    assert names and all("controller_" in n for n in names)
    path = tmp_path / "gain.pt"
    save_rule(path, _nonzero_gain(learn_lstm=False))
    loaded, _ = load_rule(path)
    assert loaded.settings.controller_hidden == 4 and not loaded.settings.learn_lstm
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        "controller_w1", "controller_b1", "controller_w2", "controller_b2"
    ]  # fmt: skip
    assert float(loaded.controller_b2.detach()) == pytest.approx(0.3)


def test_pes_estimates_a_gradient_for_the_controller_only() -> None:
    rule = _shipped(**GAIN, learn_lstm=False)
    learner = OptimizerLearner(rule)
    params = meta_parameters(learner)
    assert sum(p.numel() for p in params) == 6 * 4 + 4 + 4 + 1
    family = RandomMLPFamily("digits", (8,), (1,), ("tanh",), (16,))
    task = family.sample(torch.Generator().manual_seed(3))
    estimator = build_estimator("pes", sigma=0.1, pairs=2)
    spec = UnrollSpec(horizon=30, truncation=30, objective="final-train", log_meta_loss=True)
    (estimate,) = list(estimator.unroll(learner, task, torch.Generator().manual_seed(5), spec))
    assert estimate.grads is not None and len(estimate.grads) == len(params)
    assert all(g is not None and torch.isfinite(g).all() for g in estimate.grads)
    assert any(float(g.abs().sum()) > 0 for g in estimate.grads)


def test_saved_configurations_without_a_controller_load_without_one() -> None:
    rule, _ = load_rule(pretrained.path("general"))
    assert rule.settings.controller_hidden == 0 and rule.controller() is None
    assert "cos_avg" not in rule.init_state(3, like=torch.zeros(1))


@pytest.mark.parametrize(
    "options",
    [
        {"controller_hidden": -1},
        {"controller_hidden": 2, "controller_bound": 0.0},
        {"controller_hidden": 2, "lr_adapt": 0.0},
        {"controller_hidden": 2, "lr_adapt_slowdown": 0.0},
        {"controller_hidden": 2, "controller_drift": -0.1},
        {"controller_drift": 0.5},
        {"controller_hidden": 2, "lr_adapt_learned": True},
    ],
)
def test_invalid_controllers_are_refused(options: dict) -> None:
    with pytest.raises(ValueError, match="controller"):
        LSTMCorrectedAdamConfig(**options)


LEARNED = {"controller_hidden": 4, "controller_drift": 2.0, "lr_adapt_learned": True}


def test_zero_learned_adaptation_is_the_rule_without_adaptation() -> None:
    """At zero the learned adaptation keeps every tensor's step size where it starts: the rule
    with its adaptation off, step for step; it has no gain to learn."""
    off, _ = _train(_shipped(lr_adapt=0.0))
    learned, state = _train(_shipped(**LEARNED))
    assert all(torch.equal(a, b) for a, b in zip(off, learned))
    assert float(state["log_step"]) == 0.0
    rule = _shipped(**LEARNED)
    assert not hasattr(rule, "controller_w2")
    assert [n for n, _ in rule.named_parameters() if n.startswith("controller_")] == [
        "controller_w1", "controller_b1", "controller_drift_w", "controller_drift_b",
        "controller_linear",
    ]  # fmt: skip


def test_learned_adaptation_changes_the_log_step_by_kappa_times_its_drift() -> None:
    """Each change of the log step size is kappa_t d alone (the hand-designed cosine rule is
    not applied): with the linear path reading the cosine, d = D tanh(w cos)."""
    rule = _shipped(**LEARNED)
    with torch.no_grad():
        rule.controller_linear[0, 0] = 0.5  # the first feature: the raw cosine
    cfg = rule.settings
    gen = torch.Generator().manual_seed(1)
    state = rule.init_state(50, like=torch.zeros(1))
    for t in range(1, 9):
        g = torch.randn(50, generator=gen) + (0.5 if t < 6 else -2.0)
        prev, before = state["prev"], state["log_step"]
        _, state = rule(g, state)
        cos = torch.nn.functional.cosine_similarity(-g, prev, dim=0) if t > 1 else torch.zeros(())
        kappa = cfg.lr_adapt * (1 + cfg.lr_adapt_warmup * math.exp(-t / cfg.lr_adapt_warmup_steps))
        expected = before + kappa * 2.0 * torch.tanh(0.5 * cos)
        torch.testing.assert_close(state["log_step"], expected.reshape(1))
    assert float(state["log_step"].detach()) != 0.0


def test_unroll_and_drop_in_optimizer_agree_with_a_learned_adaptation() -> None:
    rule = _shipped(**LEARNED)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2)
        rule.controller_drift_w.normal_(0.0, 1.0, generator=gen)
        rule.controller_linear.normal_(0.0, 1.0, generator=gen)
    family, flat = _unroll_matches_drop_in(rule)
    assert not torch.allclose(flat, _drop_in_run(family, _shipped(lr_adapt=0.0), 15))


SIZED = {**LEARNED, "controller_size": True}


def test_size_feature_at_zero_is_the_rule_without_it_and_loads_older_weights() -> None:
    """``controller_size`` adds weights of its own, at zero: the rule takes the same steps as
    without it, and weights saved without it load (the new ones stay at zero)."""
    trained = _shipped(**LEARNED)
    with torch.no_grad():
        trained.controller_linear.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(5))
    without, _ = _train(trained)
    sized = trained.variant(controller_size=True)
    assert not sized.controller_size_w.detach().any()
    assert not sized.controller_size_linear.detach().any()
    with_size, _ = _train(sized)
    assert all(torch.equal(a, b) for a, b in zip(without, with_size))


def test_size_feature_adapts_tensors_of_different_sizes_differently() -> None:
    """With a weight on the size alone, the first change of each tensor's log step is
    ``kappa_1 D tanh(w log(n / 10^3) / log(10^3))``: larger for the larger tensor."""
    rule = _shipped(**SIZED)
    with torch.no_grad():
        rule.controller_size_linear.fill_(1.0)
    cfg = rule.settings
    numels = [10, 1000, 100000]
    state = rule.init_state(sum(numels), like=torch.zeros(1), numels=numels)
    _, state = rule(torch.randn(sum(numels), generator=torch.Generator().manual_seed(6)), state)
    kappa = cfg.lr_adapt * (1 + cfg.lr_adapt_warmup * math.exp(-1 / cfg.lr_adapt_warmup_steps))
    size = torch.log(torch.tensor(numels, dtype=torch.float32) / 1e3) / math.log(1e3)
    torch.testing.assert_close(state["log_step"], kappa * 2.0 * torch.tanh(size))


def test_unroll_and_drop_in_optimizer_agree_with_the_size_feature() -> None:
    rule = _shipped(**SIZED)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(7)
        rule.controller_drift_w.normal_(0.0, 1.0, generator=gen)
        rule.controller_size_w.normal_(0.0, 1.0, generator=gen)
        rule.controller_size_linear.fill_(0.5)
    # (few steps: the larger steps amplify the float rounding between the two paths)
    family, flat = _unroll_matches_drop_in(rule, steps=6)
    blind = rule.variant()
    with torch.no_grad():
        blind.controller_size_w.zero_()
        blind.controller_size_linear.zero_()
    assert not torch.allclose(flat, _drop_in_run(family, blind, 6))


def test_size_feature_needs_a_controller() -> None:
    with pytest.raises(ValueError, match="controller_size"):
        LSTMCorrectedAdamConfig(controller_size=True)
