"""The learned schedule around a rule: identity at initialization, reads the run's length only
when given, composes with the drop-in optimizer's options."""

from __future__ import annotations

import math

import pytest
import torch

import learned_opt
from learned_opt import LearnedOptimizer, LSTMOptimizer
from learned_opt.checkpoint import load_rule
from learned_opt.rules import AdamRule
from learned_opt.rules.scheduled import ScheduledRule, schedule_basis, schedule_features


def _scheduled_default() -> ScheduledRule:
    base, _ = load_rule(learned_opt.pretrained.path("general"))
    rule = ScheduledRule(base.kind, base.config())
    rule.base.load_state_dict(base.state_dict())
    return rule


def _run(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int) -> None:
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def _params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((6, 4), (4,))]


def test_zero_schedule_is_exactly_the_base_rule() -> None:
    a, b = _params(), _params()
    _run(LSTMOptimizer(a, weights="general"), a, 12)
    _run(LSTMOptimizer(b, weights=_scheduled_default(), total_steps=50), b, 12)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_unwrapped_is_the_rule_inside_the_schedule() -> None:
    rule = _scheduled_default()
    assert rule.unwrapped is rule.base and rule.base.unwrapped is rule.base
    assert AdamRule().unwrapped.kind == "adam"
    default = LSTMOptimizer([torch.nn.Parameter(torch.ones(3))])  # the shipped default
    assert isinstance(default.rule, ScheduledRule) and default.rule.unwrapped is default.rule.base


def test_features_depend_on_the_horizon_only_when_it_is_known() -> None:
    t = torch.tensor(30.0)
    unknown = schedule_features(t, torch.tensor(0.0))
    assert torch.equal(unknown[:4], torch.zeros(4))
    short, long = (
        schedule_features(t, torch.tensor(60.0)),
        schedule_features(t, torch.tensor(600.0)),
    )
    assert short[0] == 1 and short[1] == pytest.approx(0.5) and long[1] == pytest.approx(0.05)
    assert torch.equal(short[4:], long[4:])  # the step's own features do not change
    assert schedule_features(torch.tensor(90.0), torch.tensor(60.0))[1] == 1  # past the end


def test_basis_log_schedules_decay_to_the_end_warm_up_and_decay_without_an_end() -> None:
    """``schedule_basis``: a decay to ``1 / T`` at the last step of a known run (0 when unknown),
    a warm-up told or not, a horizon-free decay (0 when the run's length is known)."""
    known, unknown = torch.tensor(200.0), torch.tensor(0.0)
    first, last = schedule_basis(torch.tensor(1.0), known), schedule_basis(known, known)
    assert first[0] == 0 and last[0] == pytest.approx(-math.log(200.0))
    assert schedule_basis(torch.tensor(300.0), known)[0] == pytest.approx(-math.log(200.0))
    assert schedule_basis(torch.tensor(101.0), known)[0] == pytest.approx(math.log(0.5))
    assert first[1] == pytest.approx(math.log(1 - math.exp(-0.1)))  # warm-up: told or not
    assert schedule_basis(torch.tensor(1.0), unknown)[1] == first[1]
    assert abs(float(schedule_basis(torch.tensor(200.0), known)[1])) < 1e-8  # warmed up
    assert torch.equal(schedule_basis(torch.tensor(100.0), known)[2], torch.tensor(0.0))
    free = schedule_basis(torch.tensor(100.0), unknown)
    assert free[0] == 0 and free[2] == pytest.approx(-math.log(2.0))


def test_a_tail_log_schedule_is_the_hand_designed_late_decay() -> None:
    """``basis_tails=(c,)``: one more log-schedule, the hand-designed decay over the last
    ``c T`` steps (``ScheduledRule(tail=c)``'s), 0 when the length is unknown; it needs the
    linear path, and fractions in (0, 1]."""
    adam = AdamRule(lr=0.01).config()
    hand = ScheduledRule("adam", adam, tail=0.2)
    total = torch.tensor(100.0)
    for t in (1.0, 79.0, 81.0, 95.0, 100.0, 120.0):
        step = torch.tensor(t)
        late = schedule_basis(step, total, (0.2, 0.5))
        assert late.shape == (5,)
        assert torch.equal(late[3], hand.hand_log_scale(step, total))
    assert torch.equal(
        schedule_basis(torch.tensor(99.0), torch.tensor(0.0), (0.2,))[3], torch.tensor(0.0)
    )
    rule = ScheduledRule("adam", adam, basis=True, basis_tails=(0.2,))
    assert rule.basis.weight.shape == (1, 4) and not rule.basis.weight.any()
    assert ScheduledRule(**rule.config()).basis_tails == (0.2,)
    with pytest.raises(ValueError, match="needs basis"):
        ScheduledRule("adam", adam, basis_tails=(0.2,))
    with pytest.raises(ValueError, match="basis_tails"):
        ScheduledRule("adam", adam, basis=True, basis_tails=(0.0,))


def test_the_basis_path_starts_at_zero_and_scales_the_step_by_its_log_schedules() -> None:
    """``basis=True``: at zero the base rule step for step, told the length or not; with a
    weight ``w`` on the decay, the step of a known run ends scaled by ``exp(A tanh(-w log T /
    A))``; its configuration round-trips, and weights saved without the path load as before."""
    adam = AdamRule(lr=0.01).config()
    rule = ScheduledRule("adam", adam, basis=True)
    assert rule.config()["basis"] and ScheduledRule(**rule.config()).basis is not None
    assert ScheduledRule("adam", adam).basis is None  # (the shipped rules' configuration)
    for total in (None, 30):
        a, b = _params(), _params()
        _run(LearnedOptimizer(a, rule, total_steps=total), a, 8)
        _run(LearnedOptimizer(b, AdamRule(lr=0.01)), b, 8)
        assert all(torch.allclose(x, y) for x, y in zip(a, b))
    with torch.no_grad():
        rule.basis.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
    s = rule.log_scale(torch.tensor(30.0), torch.tensor(30.0)).detach()
    assert float(s) == pytest.approx(3.0 * math.tanh(-math.log(30.0) / 3.0), rel=1e-5)
    untold = rule.log_scale(torch.tensor(30.0), torch.tensor(0.0)).detach()
    assert float(untold) == 0  # not told: none
    assert [n for n, p in rule.named_parameters() if n.startswith("basis")] == ["basis.weight"]
    frozen = ScheduledRule("adam", adam, basis=True, learn_schedule=False)
    assert not frozen.basis.weight.requires_grad


def test_a_trained_schedule_changes_the_step_with_the_horizon_and_stays_bounded() -> None:
    rule = _scheduled_default()
    with torch.no_grad():
        rule.schedule[2].weight.fill_(5.0)
    s_short = rule.log_scale(torch.tensor(10.0), torch.tensor(20.0))
    s_long = rule.log_scale(torch.tensor(10.0), torch.tensor(2000.0))
    s_free = rule.log_scale(torch.tensor(10.0), torch.tensor(0.0))
    assert len({float(s.detach()) for s in (s_short, s_long, s_free)}) == 3
    assert max(abs(float(s.detach())) for s in (s_short, s_long, s_free)) <= rule.bound
    a, b = _params(), _params()
    _run(LSTMOptimizer(a, weights=rule, total_steps=20), a, 5)
    _run(LSTMOptimizer(b, weights=rule, total_steps=2000), b, 5)
    assert not torch.equal(a[0], b[0])


def test_total_steps_needs_a_rule_that_reads_it() -> None:
    p = [torch.nn.Parameter(torch.ones(3))]
    with pytest.raises(ValueError, match="does not read the run's length"):
        LSTMOptimizer(p, weights="general-v4", total_steps=100)  # weights with no schedule
    with pytest.raises(ValueError, match="total_steps"):
        LearnedOptimizer(p, _scheduled_default(), total_steps=0)
    with pytest.raises(ValueError, match="cannot wrap"):
        ScheduledRule("scheduled")


def test_schedule_composes_with_lr_scheduler_and_state_dict_round_trip(tmp_path) -> None:
    a = _params()
    opt = LearnedOptimizer(a, ScheduledRule("adam", AdamRule(lr=0.01).config()), total_steps=40)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        for p in a:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        sched.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    fresh = LearnedOptimizer(_params(), ScheduledRule("adam", AdamRule(lr=0.01).config()))
    with pytest.warns(UserWarning, match="saved with other weights"):
        fresh.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    state = next(iter(fresh.state.values()))
    assert float(state["total_steps"]) == 40 and float(state["step"]) == 6
    assert fresh.total_steps == 40  # not given: the saved length, for parameters added later too
    assert fresh.param_groups[0]["lr"] == pytest.approx(0.25)


def test_a_resumed_run_follows_the_length_it_is_given() -> None:
    """Resumed with another ``total_steps`` (a run lengthened), the schedule follows the new
    length, not the saved one; resumed with the same, the run continues exactly."""
    import copy

    def resumed(saved: tuple, total_steps: int | None) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(saved[1].clone())]
        opt = LSTMOptimizer(params, total_steps=total_steps)
        opt.load_state_dict(copy.deepcopy(saved[0]))
        _run(opt, params, 4)
        return params

    def saved_after(total_steps: int | None) -> tuple[tuple, list[torch.Tensor]]:
        params = [torch.nn.Parameter(torch.ones(4, 3))]
        opt = LSTMOptimizer(params, total_steps=total_steps)
        _run(opt, params, 6)
        saved = (copy.deepcopy(opt.state_dict()), params[0].detach().clone())
        _run(opt, params, 4)  # the uninterrupted run
        return saved, params

    told, uninterrupted = saved_after(6)
    assert torch.equal(resumed(told, 6)[0], uninterrupted[0])
    assert torch.equal(resumed(told, None)[0], uninterrupted[0])
    longer = resumed(told, 12)
    assert not torch.equal(longer[0], uninterrupted[0])  # no decay at steps 7-10 of 12
    untold, _ = saved_after(None)
    params = [torch.nn.Parameter(torch.ones(4, 3))]
    opt = LSTMOptimizer(params, total_steps=12)
    opt.load_state_dict(untold[0])
    assert float(opt.state[params[0]]["total_steps"]) == 12


def test_the_unroll_tells_the_rule_the_horizon() -> None:
    from learned_opt.learners import OptimizerLearner
    from learned_opt.outer import unroll
    from learned_opt.tasks import make_family

    rule = ScheduledRule("adam", AdamRule(lr=0.01).config())
    learner = OptimizerLearner(rule)
    task = make_family("quadratic").sample(torch.Generator().manual_seed(0))
    seen = []
    original = rule.forward

    def spy(grad, state):
        seen.append(float(state["total_steps"]))
        return original(grad, state)

    rule.forward = spy  # type: ignore[method-assign]
    windows = unroll(learner, task, torch.Generator().manual_seed(1), horizon=7, truncation=3)
    for _ in windows:
        pass
    assert seen == [7.0] * 7


def test_a_base_rule_without_a_step_counter_is_refused() -> None:
    with pytest.raises(ValueError, match="counts steps"):
        ScheduledRule("sgd", {"lr": 0.1})


def test_unknown_horizon_base_is_the_base_rule_without_the_horizon_only() -> None:
    base, _ = load_rule(learned_opt.pretrained.path("general"))
    rule = ScheduledRule(base.kind, base.config(), unknown_horizon="base")
    rule.base.load_state_dict(base.state_dict())
    with torch.no_grad():
        rule.schedule[2].weight.fill_(5.0)
    with torch.no_grad():
        assert float(rule.log_scale(torch.tensor(10.0), torch.tensor(0.0))) == 0.0
        assert float(rule.log_scale(torch.tensor(10.0), torch.tensor(20.0))) != 0.0
    a, b, c = _params(), _params(), _params()
    _run(LSTMOptimizer(a, weights="general"), a, 6)
    _run(LSTMOptimizer(b, weights=rule), b, 6)
    _run(LSTMOptimizer(c, weights=rule, total_steps=20), c, 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert ScheduledRule(**rule.config()).unknown_horizon == "base"  # saved with the weights
    with pytest.raises(ValueError, match="unknown_horizon"):
        ScheduledRule(base.kind, base.config(), unknown_horizon="zero")


@pytest.mark.parametrize("numel", [24, 20000])
def test_in_place_step_is_the_forward(numel: int) -> None:
    """The drop-in optimizer's in-place step (the base rule's fused kernel times the schedule's
    factor) gives the forward's updates and state, told the horizon or not."""
    rule = _scheduled_default().requires_grad_(False)  # as the drop-in optimizer holds it
    with torch.no_grad():
        rule.schedule[2].weight.fill_(2.0)
    gen = torch.Generator().manual_seed(1)
    for total in (None, 30):
        g0 = torch.randn(numel, generator=gen)
        functional = rule.init_state(numel, like=g0, total_steps=total)
        in_place = {k: v.clone() for k, v in functional.items()}
        for _ in range(6):
            g = torch.randn(numel, generator=gen)
            with torch.no_grad():
                u1, functional = rule(g, functional)
                u2 = rule.step_(g, in_place)
            torch.testing.assert_close(u2, u1, rtol=1e-5, atol=1e-7)
        assert set(in_place) == set(functional)
        for key, value in functional.items():
            torch.testing.assert_close(in_place[key], value, rtol=1e-5, atol=1e-6)
        assert float(in_place["total_steps"]) == float(total or 0)


def test_hand_designed_warmup_and_tail_follow_the_horizon() -> None:
    """``warmup`` and ``tail`` scale the base rule's step by a linear warm-up and a linear decay
    over fractions of the known horizon (the base rule itself without one), as the same
    multiplier on the drop-in optimizer's ``lr`` would; past the horizon the last factor
    stays."""
    base, _ = load_rule(learned_opt.pretrained.path("general-v4"))
    rule = ScheduledRule(base.kind, base.config(), warmup=0.1, tail=0.25, unknown_horizon="base")
    rule.base.load_state_dict(base.state_dict())
    total = 40

    def factor(t: int) -> float:
        return min(1.0, t / 4) * min(1.0, (total - t + 1) / 10)

    with torch.no_grad():
        got = [float(torch.exp(rule.log_scale(torch.tensor(float(t)), torch.tensor(40.0))))
               for t in (1, 2, 4, 20, 31, 35, 40, 60)]  # fmt: skip
        free = float(rule.log_scale(torch.tensor(3.0), torch.tensor(0.0)))
    assert got == pytest.approx([factor(t) for t in (1, 2, 4, 20, 31, 35, 40)] + [0.1], rel=1e-5)
    assert free == 0.0
    a, b = _params(), _params()
    scheduled = LSTMOptimizer(a, weights=rule, total_steps=total)
    by_lr = LSTMOptimizer(b, weights="general-v4")
    gen = torch.Generator().manual_seed(5)
    for t in range(1, total + 1):
        for group in by_lr.param_groups:
            group["lr"] = factor(t)
        for x, y in zip(a, b):
            x.grad = torch.randn(x.shape, generator=gen)
            y.grad = x.grad.clone()
        scheduled.step()
        by_lr.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="warmup"):
        ScheduledRule(base.kind, base.config(), warmup=1.0)
