"""LSTMCorrectedAdamRule (checkpoint kind "general-lstm", former name GeneralLSTMRule): the
UpdateRule contract, Adam at initialization, scale invariance, options, the preset, checkpoint
records and former configurations, the drop-in optimizer and the unroll."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from learned_opt import LearnedOptimizer, LSTMOptimizer, load_rule, pretrained, save_rule
from learned_opt.checkpoint import rule_from_dict, rule_to_dict
from learned_opt.learners import OptimizerLearner
from learned_opt.outer import unroll
from learned_opt.rules import (
    RULES,
    AdamRule,
    GeneralLSTMRule,
    LSTMCorrectedAdamConfig,
    LSTMCorrectedAdamRule,
    ScheduledRule,
    build_rule,
)
from learned_opt.rules.base import safe_sqrt
from learned_opt.rules.corrected_adam_config import GENERAL_LSTM_DEFAULTS, REMOVED_OPTIONS
from learned_opt.tasks import QuadraticFamily

OPTIONS = {
    "default": {},
    "preset": {"preset": True},  # the shipped configuration (adaptation, clipping, ...)
    "no-si": {"scale_invariant": False},
    "no-nominal": {"nominal": False},
    "2-layers": {"num_layers": 2, "hidden_size": 8},
    "fixed-lr": {"learn_lr": False},
    "no-additive": {"additive": False},
}


def _random_rule(*, preset: bool = False, **kwargs) -> LSTMCorrectedAdamRule:
    """A rule with a random (non-zero) read-out, so that every weight matters: the former
    defaults (``GeneralLSTMRule``) or the shipped configuration (``preset``) with ``kwargs``."""
    kwargs.setdefault("hidden_size", 8)
    base = LSTMCorrectedAdamConfig() if preset else GENERAL_LSTM_DEFAULTS
    rule = LSTMCorrectedAdamRule(base, **kwargs)
    rule.reset_parameters(torch.Generator().manual_seed(0), zero_output=False)
    return rule


@pytest.fixture(params=sorted(OPTIONS))
def option(request: pytest.FixtureRequest) -> dict:
    return dict(OPTIONS[request.param])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contract_shapes_dtypes_purity(option: dict, dtype: torch.dtype) -> None:
    rule = _random_rule(**option).to(dtype)
    grad = torch.randn(7, dtype=dtype)
    state = rule.init_state(7, like=grad)
    before = {k: v.clone() for k, v in state.items()}
    for _ in range(3):
        update, new_state = rule(grad, state)
        assert update.shape == (7,) and update.dtype == dtype
        assert torch.isfinite(update).all()
        assert set(new_state) == set(state)
        for k, v in new_state.items():
            dim = rule.coord_dim(k)
            if dim is not None:
                assert v.shape[dim] == 7 and v.dtype == dtype
        for k, v in state.items():  # never in place
            assert torch.equal(v, before[k])
        state, before = new_state, {k: v.clone() for k, v in new_state.items()}
        grad = torch.randn(7, dtype=dtype)


def test_coordinatewise(option: dict) -> None:
    rule = _random_rule(**option)
    a, b = torch.randn(5), torch.randn(3)
    sa, sb = (rule.init_state(n, like=a) for n in (5, 3))
    # a tensor-aware rule (the preset) is coordinatewise given the tensor layout
    s = rule.init_state(8, like=a, numels=[5, 3] if rule.tensor_aware else None)
    for _ in range(3):
        u, s = rule(torch.cat([a, b]), s)
        ua, sa = rule(a, sa)
        ub, sb = rule(b, sb)
        torch.testing.assert_close(u, torch.cat([ua, ub]))
        a, b = a * 0.5 + torch.randn(5), b * 0.5 + torch.randn(3)


def test_options_change_the_input_count() -> None:
    betas = (0.5, 0.9, 0.99, 0.999)
    assert GeneralLSTMRule().num_inputs() == 1 + len(betas) + 2
    assert GeneralLSTMRule(scale_invariant=False).num_inputs() == 2
    for kwargs in ({}, {"scale_invariant": False}):
        rule = GeneralLSTMRule(hidden_size=4, **kwargs)
        assert rule.weight_ih_l0.shape == (rule.num_inputs(), 16)
    assert GeneralLSTMRule(nominal=False).out_weight.shape[1] == 1
    assert GeneralLSTMRule().out_weight.shape[1] == 2
    assert LSTMCorrectedAdamRule().out_weight.shape[1] == 1  # no additive term
    assert "log_lr" not in dict(GeneralLSTMRule(nominal=False).named_parameters())
    assert "log_lr" not in dict(GeneralLSTMRule(learn_lr=False).named_parameters())
    assert "log_lr" in dict(LSTMCorrectedAdamRule().named_buffers())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", [{}, {"scale_invariant": False}, {"num_layers": 2}])
def test_starts_as_adam(dtype: torch.dtype, kwargs: dict) -> None:
    """With the default (zero) read-out the rule is Adam with lr = the base learning rate, in
    the drop-in optimizer, whatever its inputs."""
    torch.manual_seed(0)
    ref = [torch.randn(4, 3, dtype=dtype, requires_grad=True), torch.randn(5, dtype=dtype)]
    ref[1].requires_grad_(True)
    mine = [p.detach().clone().requires_grad_(True) for p in ref]
    opt_ref = torch.optim.Adam(ref, lr=3e-2, betas=(0.8, 0.99), eps=1e-6, foreach=False)
    rule = GeneralLSTMRule(hidden_size=8, lr=3e-2, beta1=0.8, beta2=0.99, eps=1e-6, **kwargs)
    opt_mine = LearnedOptimizer(mine, rule)
    for step in range(20):
        for params, opt in ((ref, opt_ref), (mine, opt_mine)):
            opt.zero_grad()
            loss = sum(((p - 1) ** 2 * (1 + step % 3)).sum() + p.sin().sum() for p in params)
            loss.backward()
            opt.step()
    for a, b in zip(ref, mine):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0)
    # and the raw update equals AdamRule's on the flat vector
    grad = torch.randn(6, dtype=torch.float64)
    r = GeneralLSTMRule(hidden_size=4, lr=1e-3).double()
    u, _ = r(grad, r.init_state(6, like=grad))
    a, _ = AdamRule(lr=1e-3)(grad, AdamRule().init_state(6, like=grad))
    torch.testing.assert_close(u, a, rtol=1e-6, atol=0)


@pytest.mark.parametrize("c", [1e-3, 1e3])
def test_scale_invariance(c: float) -> None:
    """With scale_invariant and nominal, gradients multiplied by a constant give the same updates
    (up to eps), with a trained-looking (random) network."""
    rule = _random_rule(eps=1e-12).double()
    gen = torch.Generator().manual_seed(0)
    s1 = rule.init_state(50, like=torch.zeros(1, dtype=torch.float64))
    s2 = {k: v.clone() for k, v in s1.items()}
    for _ in range(6):
        g = torch.randn(50, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 10, 50)
        u1, s1 = rule(g, s1)
        u2, s2 = rule(c * g, s2)
        torch.testing.assert_close(u1, u2, rtol=1e-7, atol=1e-12)
    # the paper's preprocessing is not invariant
    plain = _random_rule(scale_invariant=False, eps=1e-12).double()
    g = torch.randn(50, generator=gen, dtype=torch.float64)
    u1, _ = plain(g, plain.init_state(50, like=g))
    u2, _ = plain(c * g, plain.init_state(50, like=g))
    assert not torch.allclose(u1, u2)


def test_update_is_differentiable_in_every_weight(option: dict) -> None:
    rule = _random_rule(**option).double()
    grad = torch.randn(9, dtype=torch.float64)
    state = rule.init_state(9, like=grad)
    total = torch.zeros((), dtype=torch.float64)
    for _ in range(3):
        update, state = rule(grad, state)
        total = total + (update * torch.linspace(-1, 2, 9, dtype=torch.float64)).sum()
        grad = grad * 0.7 + 0.3
    grads = torch.autograd.grad(total, list(rule.parameters()))
    for (name, _), g in zip(rule.named_parameters(), grads):
        assert torch.isfinite(g).all(), name
        assert g.abs().sum() > 0, name


def test_meta_gradient_gradcheck_two_step_unroll() -> None:
    """Second-order meta-gradient of a two-step unroll vs finite differences."""
    task = QuadraticFamily(dim=3, dtype=torch.float64).sample(torch.Generator().manual_seed(0))
    rule = _random_rule(hidden_size=3, lr=0.05).double()
    names = [n for n, _ in rule.named_parameters()]

    def meta_loss(*weights: torch.Tensor) -> torch.Tensor:
        learner = OptimizerLearner(rule, second_order=True)
        with torch.nn.utils.stateless._reparametrize_module(rule, dict(zip(names, weights))):
            (window,) = list(
                unroll(learner, task, torch.Generator().manual_seed(1), horizon=2, truncation=2)
            )
            return window.meta_loss

    weights = tuple(p.detach().clone().requires_grad_(True) for p in rule.parameters())
    assert torch.autograd.gradcheck(meta_loss, weights, eps=1e-6, atol=1e-5)


def test_zero_readout_still_gets_a_meta_gradient() -> None:
    """At the Adam initialization the read-out and the base lr get meta-gradients (training can
    leave Adam), in the first-order unroll the trainer uses."""
    task = QuadraticFamily(dim=5).sample(torch.Generator().manual_seed(0))
    rule = GeneralLSTMRule(hidden_size=4, lr=0.05)
    learner = OptimizerLearner(rule)
    windows = unroll(learner, task, torch.Generator().manual_seed(1), horizon=6, truncation=3)
    loss = next(windows).meta_loss
    loss.backward()
    assert rule.out_weight.grad.abs().sum() > 0 and rule.log_lr.grad.abs() > 0


def test_config_round_trip_through_checkpoint_records(option: dict, tmp_path: Path) -> None:
    rule = _random_rule(**option)
    assert RULES["general-lstm"] is LSTMCorrectedAdamRule
    clone = build_rule(rule.kind, rule.config())
    assert clone.config() == rule.config()
    loaded = rule_from_dict(rule_to_dict(rule), expected_kind="general-lstm")
    assert loaded.config() == rule.config()
    for (n, a), (_, b) in zip(rule.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    save_rule(tmp_path / "w.pt", rule, {"note": "test"})
    from_file, meta = load_rule(tmp_path / "w.pt")
    assert isinstance(from_file, GeneralLSTMRule) and meta == {"note": "test"}
    grad = torch.randn(4)
    u1, _ = rule(grad, rule.init_state(4, like=grad))
    u2, _ = from_file(grad, from_file.init_state(4, like=grad))
    torch.testing.assert_close(u1, u2)


def test_drop_in_optimizer_state_dict_and_bf16_state() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x, y = torch.randn(32, 6), torch.randn(32, 2)
    opt = LearnedOptimizer(model.parameters(), _random_rule(lr=0.01), lr=1.0)
    first = None
    for _ in range(15):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = float(loss.detach()) if first is None else first
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first
    sd = opt.state_dict()
    opt2 = LearnedOptimizer(model.parameters(), GeneralLSTMRule(hidden_size=8, lr=0.01))
    with pytest.warns(UserWarning, match="saved with other weights"):  # (its own, saved)
        opt2.load_state_dict(sd)
    assert torch.equal(opt2.rule.out_weight, opt.rule.out_weight)
    p = next(iter(model.parameters()))
    assert torch.equal(opt2.state[p]["v"], opt.state[p]["v"])
    bf = LearnedOptimizer(model.parameters(), _random_rule(), state_dtype=torch.bfloat16)
    torch.nn.functional.mse_loss(model(x), y).backward()
    bf.step()
    assert bf.state[p]["h0"].dtype == torch.bfloat16 and bf.state[p]["step"].dtype == torch.float32


def test_validates_arguments() -> None:
    with pytest.raises(ValueError, match="hidden_size"):
        GeneralLSTMRule(hidden_size=0)
    with pytest.raises(ValueError, match="beta"):
        GeneralLSTMRule(beta2=1.0)
    with pytest.raises(ValueError, match="momentum_betas"):
        GeneralLSTMRule(momentum_betas=())  # removed: only the four timescales
    with pytest.raises(ValueError, match="Invalid lr"):
        GeneralLSTMRule(lr=0.0)
    with pytest.raises(ValueError, match="Unknown options"):
        LSTMCorrectedAdamRule(hidden=3)
    with pytest.raises(TypeError, match="by position"):
        GeneralLSTMRule(8, 1, True)
    assert math.isclose(float(GeneralLSTMRule(lr=0.02).log_lr.detach().exp()), 0.02, rel_tol=1e-6)


def test_lstm_optimizer_loads_general_weights_by_path(tmp_path: Path) -> None:
    from learned_opt import LSTMOptimizer

    rule = GeneralLSTMRule(hidden_size=8)
    save_rule(tmp_path / "g.pt", rule, {"note": "test"})
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = LSTMOptimizer([w], weights=tmp_path / "g.pt")
    assert isinstance(opt.rule, GeneralLSTMRule) and opt.metadata["note"] == "test"
    w.grad = torch.tensor([0.5, -0.5, 1.0])
    opt.step()
    # At initialization the rule is Adam: the first step moves each coordinate by lr * sign(g).
    torch.testing.assert_close(
        w.detach(), torch.tensor([1.0, -2.0, 3.0]) - rule.lr * torch.tensor([1.0, -1.0, 1.0])
    )


@pytest.mark.parametrize("make", [lambda: _random_rule(), lambda: AdamRule(lr=0.1)])
def test_second_order_meta_gradient_is_finite_where_gradients_are_zero(make) -> None:
    """Coordinates whose gradient is exactly 0 (dead units) have second moment 0; the
    second-order meta-gradient through sqrt(v) must be 0 there, not nan."""
    rule = make()
    grad = torch.tensor([0.0, 0.5, -1.0, 0.0]).requires_grad_(True)
    state = rule.init_state(4, like=grad)
    total = torch.zeros(())
    for _ in range(3):
        update, state = rule(grad * 1.0, state)
        total = total + update.pow(2).sum()
    (d_grad,) = torch.autograd.grad(total, grad, retain_graph=True)
    assert torch.isfinite(d_grad).all() and d_grad[1:3].abs().min() > 0
    theta = [p for p in rule.parameters() if p.requires_grad]
    for g in torch.autograd.grad(total, theta) if theta else []:
        assert torch.isfinite(g).all()
    # Same values as the plain sqrt.
    v = torch.tensor([0.0, 4.0]).requires_grad_(True)
    torch.testing.assert_close(safe_sqrt(v), torch.tensor([0.0, 2.0]))


# --------------------------------------------------------------------- per-tensor step sizes
def _hd_adam_reference(
    params,
    grads_fn,
    steps,
    lr,
    kappa,
    bound,
    betas=(0.9, 0.999),
    eps=1e-8,
    warmup=0.0,
    warmup_steps=20.0,
    shrink=1.0,
    margin=0.2,
    clip=0.0,
    slowdown=0.0,
    slowdown_rate=0.3,
):
    """Adam whose per-tensor step size follows the multiplicative hypergradient rule
    ``s += kappa_t * c(cos(-g_t, d_{t-1}))`` with ``kappa_t = kappa (1 + warmup e^{-t/tau})``,
    ``c`` counting cosines below ``-margin`` ``shrink`` times, and each tensor's gradient norm
    clipped at ``sqrt(clip)`` times its running RMS, and positive cosines counted
    ``slowdown_rate`` times once the gradient norm fell below ``1/slowdown`` of its peak (written
    out here independently of the library, with Python floats per tensor)."""
    b1, b2 = betas
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    prev = [torch.zeros_like(p) for p in params]
    s = [0.0 for _ in params]
    fast = [0.0 for _ in params]
    peak = [0.0 for _ in params]
    for t in range(1, steps + 1):
        grads = grads_fn(params)
        new = []
        for i, (p, g) in enumerate(zip(params, grads)):
            if clip and t > 1:
                ref = float(v[i].sum()) / (1 - b2 ** (t - 1))
                n2 = float((g * g).sum())
                if ref > 0 and n2 > clip * ref:
                    g = g * math.sqrt(clip * ref / n2)
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            d = -(m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + eps)
            norm = float(g.norm() * prev[i].norm())
            cos = float(-(g * prev[i]).sum()) / norm if norm > 0 else 0.0
            if cos < -margin:
                cos = -margin + shrink * (cos + margin)
            if slowdown:
                fast[i] = 0.9 * fast[i] + 0.1 * float((g * g).sum())
                norm_t = math.sqrt(fast[i] / (1 - 0.9**t))
                peak[i] = max(peak[i], norm_t)
                if cos > 0 and norm_t * slowdown < peak[i]:
                    cos *= slowdown_rate
            rate = kappa * (1 + warmup * math.exp(-t / warmup_steps))
            s[i] = min(max(s[i] + rate * cos, -bound), bound)
            prev[i] = d
            new.append(p + lr * math.exp(s[i]) * d)
        params = new
    return params, s


def test_lr_adapt_starts_as_hypergradient_adam() -> None:
    """With a zero read-out and ``lr_adapt`` the drop-in optimizer is Adam with a per-tensor
    multiplicative hypergradient step size, including in tensors larger than a chunk."""
    torch.manual_seed(0)
    init = [torch.randn(40, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)]
    targets = [torch.randn_like(p) for p in init]

    def grads_fn(params):
        return [2 * (p - y) * (1 + y.abs()) + 0.1 * torch.cos(p) for p, y in zip(params, targets)]

    ref, s_ref = _hd_adam_reference(init, grads_fn, 40, lr=0.01, kappa=0.2, bound=2.0)
    rule = GeneralLSTMRule(hidden_size=4, lr=0.01, lr_adapt=0.2, lr_adapt_bound=2.0).double()
    assert rule.tensor_aware
    mine = [p.clone().requires_grad_(True) for p in init]
    opt = LearnedOptimizer(mine, rule)
    opt.chunk_size = 16  # smaller than the first tensor: it must still see the whole tensor
    for _ in range(40):
        for p, g in zip(mine, grads_fn([p.detach() for p in mine])):
            p.grad = g
        opt.step()
    for a, b in zip(ref, mine):  # (the base lr is stored as a float32 log: 1e-7 relative)
        torch.testing.assert_close(b.detach(), a, rtol=1e-5, atol=1e-9)
    for p, s in zip(mine, s_ref):  # one log step size per tensor
        torch.testing.assert_close(opt.state[p]["log_step"], torch.tensor([s], dtype=p.dtype))
    assert max(abs(s) for s in s_ref) > 0.5  # the step sizes did move


def test_warmup_shrink_and_grad_clip_match_the_reference() -> None:
    """All three stabilizers on (adaptation warm-up, the faster shrink, gradient clipping), with
    gradients whose scale jumps, so that the clipping and the shrink both act."""
    torch.manual_seed(1)
    init = [torch.randn(40, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)]
    targets = [torch.randn_like(p) for p in init]
    calls = [0]

    def grads_fn(params):
        calls[0] += 1
        spike = 30.0 if calls[0] % 7 == 0 else 1.0  # a rare large gradient
        return [
            spike * (2 * (p - y) * (1 + y.abs()) + 0.1 * torch.cos(p))
            for p, y in zip(params, targets)
        ]

    options = dict(
        warmup=4.0,
        warmup_steps=10.0,
        shrink=3.0,
        margin=0.1,
        clip=2.0,
        slowdown=3.0,
        slowdown_rate=0.25,
    )
    ref, s_ref = _hd_adam_reference(init, grads_fn, 40, lr=0.05, kappa=0.2, bound=2.0, **options)
    for off in ({}, {**options, "slowdown": 0.0}):  # the options (and the slowdown) matter
        calls[0] = 0
        _, s_off = _hd_adam_reference(init, grads_fn, 40, lr=0.05, kappa=0.2, bound=2.0, **off)
        assert max(abs(a - b) for a, b in zip(s_ref, s_off)) > 0.05
    calls[0] = 0
    rule = GeneralLSTMRule(
        hidden_size=4,
        lr=0.05,
        lr_adapt=0.2,
        lr_adapt_bound=2.0,
        lr_adapt_warmup=4.0,
        lr_adapt_warmup_steps=10.0,
        lr_adapt_shrink=3.0,
        lr_adapt_margin=0.1,
        grad_clip=2.0,
        lr_adapt_slowdown=3.0,
        lr_adapt_slowdown_rate=0.25,
    ).double()
    mine = [p.clone().requires_grad_(True) for p in init]
    opt = LearnedOptimizer(mine, rule)
    opt.chunk_size = 16
    for _ in range(40):
        for p, g in zip(mine, grads_fn([p.detach() for p in mine])):
            p.grad = g
        opt.step()
    for a, b in zip(ref, mine):
        torch.testing.assert_close(b.detach(), a, rtol=1e-5, atol=1e-9)
    for p, s in zip(mine, s_ref):  # one log step size per tensor
        torch.testing.assert_close(opt.state[p]["log_step"], torch.tensor([s], dtype=p.dtype))


def test_grad_clip_bounds_a_rare_large_gradient_per_tensor() -> None:
    rule = GeneralLSTMRule(hidden_size=2, lr=0.01, grad_clip=4.0).double().requires_grad_(False)
    assert rule.tensor_aware
    g = torch.tensor([1.0, -1.0, 0.5, 0.5], dtype=torch.float64)
    state = rule.init_state(4, like=g, numels=[2, 2])
    for _ in range(20):
        quiet, state = rule(g, state)
    spike = g * torch.tensor([100.0, 100.0, 1.0, 1.0], dtype=torch.float64)  # tensor 0 only
    update, after = rule(spike, state)
    # tensor 0's gradient enters the moments at norm 2 x its RMS (sqrt(4)); tensor 1 untouched
    v_prev = state["v"] / (1 - 0.999**20)
    seen0 = spike[:2] * torch.sqrt(4.0 * v_prev[:2].sum() / spike[:2].square().sum())
    torch.testing.assert_close(after["v"][:2], 0.999 * state["v"][:2] + 0.001 * seen0**2)
    torch.testing.assert_close(after["v"][2:], 0.999 * state["v"][2:] + 0.001 * g[2:] ** 2)
    free = GeneralLSTMRule(hidden_size=2, lr=0.01).double().requires_grad_(False)
    unclipped, _ = free(spike, {k: v for k, v in state.items() if k != "tensor"})
    assert not torch.allclose(update[:2], unclipped[:2])
    torch.testing.assert_close(update[2:], unclipped[2:])
    # no history (the first step, or a tensor whose gradients were all zero): nothing clipped
    fresh = rule.init_state(4, like=g, numels=[2, 2])
    _, fresh = rule(torch.zeros(4, dtype=torch.float64), fresh)
    _, fresh = rule(spike, fresh)
    torch.testing.assert_close(fresh["v"], 0.001 * spike**2)


@pytest.mark.parametrize("t", [2, 5, 30])
def test_grad_clip_warmup_loosens_the_clipping_early(t: int) -> None:
    """The clip threshold is Q (1 + C exp(-t / tau)) at step t: a spike enters the moments at
    sqrt(Q_t) times the running RMS norm."""
    q, c, tau = 2.0, 3.0, 10.0
    rule = (
        GeneralLSTMRule(
            hidden_size=2, lr=0.01, grad_clip=q, grad_clip_warmup=c, lr_adapt_warmup_steps=tau
        )
        .double()
        .requires_grad_(False)
    )
    g = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    state = rule.init_state(3, like=g)
    for _ in range(t - 1):
        _, state = rule(g, state)
    spike = 100.0 * g
    _, after = rule(spike, state)
    v_prev = state["v"] / (1 - 0.999 ** (t - 1))
    q_t = q * (1 + c * math.exp(-t / tau))
    seen = spike * torch.sqrt(q_t * v_prev.sum() / spike.square().sum())
    torch.testing.assert_close(after["v"], 0.999 * state["v"] + 0.001 * seen**2)
    # without the warm-up the same spike is clipped harder
    plain = GeneralLSTMRule(hidden_size=2, lr=0.01, grad_clip=q).double().requires_grad_(False)
    _, tight = plain(spike, state)
    assert float(tight["v"].sum()) < float(after["v"].sum())


def test_the_preset_is_the_shipped_configuration() -> None:
    """LSTMCorrectedAdamConfig's defaults are the configuration of the shipped "general" weights
    (their record and their metadata), the default weights are those with the settings that
    their metadata and those of the weights they derive from name (a schedule around them: its
    hand-designed part as named), and the kind "lstm-corrected-adam" builds it from no options."""
    rule, meta = load_rule(pretrained.path("general"))
    assert type(rule) is LSTMCorrectedAdamRule and rule.settings == LSTMCorrectedAdamConfig()
    assert LSTMCorrectedAdamRule().config() == rule.config()
    shipped = pretrained.metadata("general")["config"]["rule_kwargs"]
    assert LSTMCorrectedAdamConfig().replace(**shipped) == LSTMCorrectedAdamConfig()
    default, meta = load_rule(pretrained.path(pretrained.DEFAULT))
    changed: dict = {}
    while "derived_from" in meta:  # the default, then each weights it derives from
        settings = meta["derived_from"]["settings"]
        assert settings
        if "warmup" in settings:  # a schedule's hand-designed part, around the rule inside
            assert isinstance(default, ScheduledRule)
            assert (default.warmup, default.tail) == (settings["warmup"], settings["tail"])
        else:  # settings of the rule (inside the schedule, if any)
            changed = {**settings, **changed}
        meta = pretrained.metadata(meta["derived_from"]["weights"])
    assert meta == pretrained.metadata("general")
    rule = default.unwrapped
    assert changed and rule.settings == LSTMCorrectedAdamConfig().replace(**changed)
    assert build_rule("lstm-corrected-adam", {}).settings == LSTMCorrectedAdamConfig()
    assert build_rule("lstm-corrected-adam", {"hidden_size": 8}).settings == (
        LSTMCorrectedAdamConfig(hidden_size=8)
    )
    # options left out of a "general-lstm" configuration keep their former defaults
    assert build_rule("general-lstm", {}).settings == GENERAL_LSTM_DEFAULTS
    assert GeneralLSTMRule(hidden_size=8).settings == GENERAL_LSTM_DEFAULTS.replace(hidden_size=8)
    opt = LSTMOptimizer([torch.nn.Parameter(torch.zeros(3))])
    assert isinstance(opt.rule.unwrapped, LSTMCorrectedAdamRule)
    assert isinstance(opt.rule.unwrapped, GeneralLSTMRule)
    with pytest.raises(dataclasses.FrozenInstanceError):
        LSTMCorrectedAdamConfig().lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("key", sorted(REMOVED_OPTIONS))
def test_removed_options_load_at_their_former_default_and_are_refused_otherwise(key: str) -> None:
    """Configurations saved before an option was removed carry it (every option was saved):
    at the one value still implemented it is dropped, at any other a ValueError names it."""
    rule = _random_rule(lr_adapt=0.1, grad_clip=2.0)
    record = rule_to_dict(rule)
    old = REMOVED_OPTIONS[key]
    record["config"][key] = list(old) if isinstance(old, tuple) else old
    loaded = rule_from_dict(record, expected_kind="general-lstm")
    assert loaded.config() == rule.config()
    for a, b in zip(rule.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    other = {
        "momentum_betas": [0.9, 0.999],
        "log_features": False,
        "output_scale": 0.2,
        "preprocess_p": 5.0,
        "forget_bias": 0.0,
        "grad_clip_aligned": 4.0,
    }[key]
    record["config"][key] = other
    with pytest.raises(ValueError, match=key):
        rule_from_dict(record, expected_kind="general-lstm")
    with pytest.raises(ValueError, match=key):
        GeneralLSTMRule(**{key: other})


def test_both_ablations_off_is_the_paper_lstm_and_refused() -> None:
    with pytest.raises(ValueError, match="LSTMRule"):
        GeneralLSTMRule(scale_invariant=False, nominal=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_optimizer_state_with_per_coordinate_step_sizes_loads_and_steps_the_same(
    dtype: torch.dtype,
) -> None:
    """Optimizer states written when the per-tensor numbers (log step size, gradient norm and
    its peak) were kept once per coordinate continue exactly like the per-tensor layout (in
    float16 also a tensor stepped in chunks of coordinates)."""
    torch.manual_seed(0)
    rule = _random_rule(preset=True)
    params = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(7))]
    if dtype == torch.float16:
        params = [torch.nn.Parameter(p.detach().half()) for p in params]
        params.append(torch.nn.Parameter(torch.randn(20_000).half()))
    opt = LearnedOptimizer(params, rule)
    for _ in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())  # (state_dict() shares the state's tensors)
    for entry in sd["state"].values():  # the former layout: the value at every coordinate
        n = entry["v"].numel()
        for key in ("log_step", "grad_fast", "grad_peak"):
            entry[key] = entry[key].expand(n).clone()
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    old = LearnedOptimizer(twins, rule)
    old.load_state_dict(sd)
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    for step in grads:
        for group in (params, twins):
            for p, g in zip(group, step):
                p.grad = g.clone()
        opt.step()
        old.step()
    for a, b in zip(params, twins):
        assert torch.equal(a, b)
    for p, q in zip(params, twins):
        for key in ("log_step", "grad_fast", "grad_peak"):
            assert old.state[q][key].shape == (1,) and torch.equal(
                old.state[q][key], opt.state[p][key]
            )


def test_lr_adapt_grows_along_and_shrinks_against_the_last_step() -> None:
    rule = GeneralLSTMRule(hidden_size=4, lr=0.01, lr_adapt=0.1, lr_adapt_bound=0.35)
    rule = rule.double().requires_grad_(False)
    g = torch.tensor([2.0, -2.0, 2.0], dtype=torch.float64)  # parallel to its Adam step
    state = rule.init_state(3, like=g)
    logs = []
    for _ in range(6):  # a constant gradient: every step agrees with the previous one
        _, state = rule(g, state)
        logs.append(float(state["log_step"][0]))
    assert logs[0] == 0.0  # no previous step yet
    torch.testing.assert_close(logs[1:4], [0.1, 0.2, 0.3])
    assert logs[-1] == pytest.approx(0.35)  # clipped at the bound
    _, flipped = rule(-10 * g, state)  # the gradient turns against the last step
    assert float(flipped["log_step"][0]) == pytest.approx(0.25)
    assert torch.all(flipped["log_step"] == flipped["log_step"][0])  # one value per tensor


STABLE = {
    "lr_adapt_warmup": 5.0,
    "lr_adapt_shrink": 3.0,
    "grad_clip": 2.0,
    "lr_adapt_slowdown": 2.0,
}


@pytest.mark.parametrize("extra", [{}, STABLE], ids=["plain", "stable"])
@pytest.mark.parametrize("nominal", [True, False])
def test_lr_adapt_flat_layout_matches_per_tensor(nominal: bool, extra: dict) -> None:
    """On the unroll's flat vector (``numels`` given) the rule gives each tensor the updates it
    gets alone, with a trained-looking (random) network; without ``numels`` it would not. (Without
    the nominal step the adapted step size multiplies the network's update.)"""
    rule = _random_rule(lr_adapt=0.3, nominal=nominal, **extra).double()
    gen = torch.Generator().manual_seed(0)
    sizes = [5, 1, 7]
    flat_state = rule.init_state(13, like=torch.zeros(1, dtype=torch.float64), numels=sizes)
    one_state = rule.init_state(13, like=torch.zeros(1, dtype=torch.float64))
    states = [rule.init_state(n, like=torch.zeros(1, dtype=torch.float64)) for n in sizes]
    g = torch.randn(13, generator=gen, dtype=torch.float64)
    for _ in range(5):
        u, flat_state = rule(g, flat_state)
        u_one, one_state = rule(g, one_state)
        parts = []
        for k, part in enumerate(g.split(sizes)):
            uk, states[k] = rule(part, states[k])
            parts.append(uk)
        torch.testing.assert_close(u, torch.cat(parts), rtol=1e-10, atol=1e-14)
        g = 0.6 * g + torch.randn(13, generator=gen, dtype=torch.float64) * torch.tensor(
            [1.0] * 5 + [-3.0] + [0.2] * 7, dtype=torch.float64
        )
    assert not torch.allclose(u, u_one)
    with pytest.raises(ValueError, match="add up"):
        rule.init_state(13, like=g, numels=[5, 7])


@pytest.mark.parametrize(
    "extra", [{}, STABLE, {"lr_size_ref": 64.0}], ids=["plain", "stable", "size-scaled"]
)
def test_lr_adapt_unroll_passes_the_layout_and_matches_the_drop_in_optimizer(extra: dict) -> None:
    from learned_opt.tasks import RandomMLPFamily

    rule = _random_rule(lr_adapt=0.2, lr=0.01, **extra)
    family = RandomMLPFamily("digits", (8,), (1,), ("tanh",), (16,))
    task = family.sample(torch.Generator().manual_seed(3))
    learner = OptimizerLearner(rule)
    state = learner.init_state(task, torch.Generator().manual_seed(4))
    ids = state.rule_state["tensor"]
    assert ids.dtype == torch.int64 and int(ids[-1]) == len(state.spec.numels) - 1
    windows = list(
        unroll(
            learner,
            task,
            torch.Generator().manual_seed(4),
            horizon=12,
            truncation=4,
            differentiable=False,
        )
    )
    unrolled = windows[-1].state.params
    # the same task (same batch stream) with the drop-in optimizer, one call per tensor
    task = family.sample(torch.Generator().manual_seed(3))
    leaves = {
        k: v.clone().requires_grad_(True)
        for k, v in task.init_params(torch.Generator().manual_seed(4)).items()
    }
    opt = LearnedOptimizer(list(leaves.values()), rule)
    for _ in range(12):
        opt.zero_grad()
        task.loss(leaves, task.train.sample()).backward()
        opt.step()
    torch.testing.assert_close(
        torch.cat([p.detach().reshape(-1) for p in leaves.values()]),
        unrolled,
        rtol=1e-5,
        atol=1e-6,
    )


def test_lr_adapt_meta_gradient_and_validation() -> None:
    rule = _random_rule(lr_adapt=0.1)
    task = QuadraticFamily(dim=5).sample(torch.Generator().manual_seed(0))
    learner = OptimizerLearner(rule)
    windows = unroll(learner, task, torch.Generator().manual_seed(1), horizon=8, truncation=8)
    next(windows).meta_loss.backward()
    for name, p in rule.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    clone = rule_from_dict(rule_to_dict(rule), expected_kind="general-lstm")
    assert clone.config()["lr_adapt"] == 0.1 and clone.tensor_aware
    assert not GeneralLSTMRule().tensor_aware
    with pytest.raises(ValueError, match="lr_adapt"):
        GeneralLSTMRule(lr_adapt=-1.0)
    for bad in (
        {"lr_adapt_warmup": -1.0},
        {"lr_adapt_warmup_steps": 0.0},
        {"lr_adapt_shrink": 0.5},
        {"lr_adapt_margin": -0.1},
        {"grad_clip": -1.0},
        {"lr_adapt_slowdown": -1.0},
        {"lr_adapt_slowdown_rate": 1.5},
        {"grad_clip_warmup": -1.0},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GeneralLSTMRule(**bad)
    stable = _random_rule(
        lr_adapt=0.1, lr_adapt_warmup=5.0, lr_adapt_shrink=3.0, grad_clip=2.0, grad_clip_warmup=3.0
    )
    clone = rule_from_dict(rule_to_dict(stable), expected_kind="general-lstm")
    assert clone.config() == stable.config() and clone.config()["grad_clip"] == 2.0
    assert clone.config()["grad_clip_warmup"] == 3.0
    # configurations written before the option load without it (no warm-up)
    legacy = {k: v for k, v in stable.config().items() if k != "grad_clip_warmup"}
    assert build_rule("general-lstm", legacy).grad_clip_warmup == 0.0
    assert GeneralLSTMRule(grad_clip=2.0).tensor_aware


def test_lr_adapt_meta_gradient_is_finite_when_a_tensor_gets_no_gradient() -> None:
    """A tensor whose gradient is all zero (a dead layer) has cos = 0; the meta-gradient through
    the norm product must be 0 there, not 0 * inf = nan."""
    rule = _random_rule(lr_adapt=0.1, lr_adapt_shrink=3.0, grad_clip=2.0, lr_adapt_slowdown=2.0)
    state = rule.init_state(6, like=torch.zeros(1), numels=[3, 3])
    total = torch.zeros(())
    for _ in range(3):
        grad = torch.tensor([0.5, -1.0, 2.0, 0.0, 0.0, 0.0])
        update, state = rule(grad, state)
        total = total + update.sum()
    grads = torch.autograd.grad(total, list(rule.parameters()))
    for (name, _), g in zip(rule.named_parameters(), grads):
        assert torch.isfinite(g).all(), name


def test_without_the_additive_term_the_read_out_only_rescales_adam() -> None:
    """``additive=False``: one read-out column (the log-scale correction), and the update equals
    that of the two-column rule whose additive column is zero; weights saved before the option
    existed (no ``additive`` in their config) load as additive."""
    full = _random_rule(lr_adapt=0.1, lr_adapt_warmup=5.0, grad_clip=2.0)
    scale_only = GeneralLSTMRule(**{**full.config(), "additive": False})
    assert scale_only.out_weight.shape == (8, 1) and scale_only.out_bias.shape == (1,)
    with torch.no_grad():
        for name, p in scale_only.named_parameters():
            src = getattr(full, name)
            p.copy_(src[..., :1] if name.startswith("out_") else src)
        full.out_weight[:, 1] = 0.0
        full.out_bias[1] = 0.0
    g = torch.Generator().manual_seed(3)
    s_full = full.init_state(6, like=torch.zeros(1), numels=[4, 2])
    s_one = scale_only.init_state(6, like=torch.zeros(1), numels=[4, 2])
    for _ in range(5):
        grad = torch.randn(6, generator=g)
        u_full, s_full = full(grad, s_full)
        u_one, s_one = scale_only(grad, s_one)
        torch.testing.assert_close(u_one, u_full)
    legacy = {k: v for k, v in full.config().items() if k != "additive"}
    assert build_rule("general-lstm", legacy).additive


def test_options_that_would_do_nothing_are_refused() -> None:
    """The size-scaled start is a start of the adapted step size: without the adaptation it
    would do nothing, so the configuration is an error, not a silent no-op."""
    with pytest.raises(ValueError, match="lr_size_ref"):
        GeneralLSTMRule(hidden_size=4, lr_adapt=0.0, lr_size_ref=64.0)


def test_variant_with_another_base_rate_steps_at_it() -> None:
    rule = _random_rule(lr_adapt=0.0, grad_clip=0.0, learn_lr=False)
    faster = rule.variant(lr=10 * rule.lr)
    g = torch.randn(50, generator=torch.Generator().manual_seed(0))
    slow, _ = rule(g, rule.init_state(50, like=g))
    fast, _ = faster(g, faster.init_state(50, like=g))
    torch.testing.assert_close(fast, 10 * slow)


def test_trailing_empty_tensors_keep_each_tensor_its_own_step_size() -> None:
    """A flat state of tensors [2, 3, 0, 0, 0] (as many tensors as coordinates): every tensor
    keeps its own log step size."""
    rule = _random_rule(lr_adapt=0.1, lr_size_ref=1.0)
    sizes = [2, 3, 0, 0, 0]
    state = rule.init_state(5, like=torch.zeros(1), numels=sizes)
    start = state["log_step"].clone()
    _, new = rule(torch.ones(5), state)
    assert new["log_step"].shape == (5,)
    assert new["log_step"][1] != 0 and new["log_step"][1] == pytest.approx(float(start[1]), abs=0.2)
