"""No finite gradient, however large or small, turns a parameter or the optimizer state into NaN
or Inf, for every shipped weights file; a non-finite update is skipped or raised like a
non-finite gradient, with parameters and state left as they were."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from learned_opt import LearnedOptimizer, LSTMOptimizer, NonFiniteGradientError, pretrained
from learned_opt.checkpoint import load_rule
from learned_opt.rules import AdamRule, SGDRule, UpdateRule
from learned_opt.rules.base import bounded_grad, grad_bound

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
WEIGHTS = pretrained.available()


def _finite_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def _state_finite(opt: torch.optim.Optimizer) -> bool:
    return all(
        torch.isfinite(v).all()
        for state in opt.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    )


def test_grad_bound_keeps_squares_and_their_sums_finite() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        g = grad_bound(dtype)
        assert g * g * 2.0**36 * 8 < _finite_max(dtype)
        assert g > 1e12  # far above any real gradient
    x = torch.tensor([1.5, -3e38, 3e38, 0.0, -1e-38])
    y = bounded_grad(x)
    assert torch.equal(y[[0, 3, 4]], x[[0, 3, 4]])  # unchanged in the normal range
    assert y[1] == -grad_bound(torch.float32) and y[2] == grad_bound(torch.float32)


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exponent", [-38, -20, -5, 0, 5, 15, 19, 20, 30, 38, 300])
def test_every_magnitude_every_dtype_every_shipped_rule(weights, dtype, exponent) -> None:
    """Five steps at gradients of magnitude 10**exponent (clipped to the dtype's largest finite
    number), with mixed signs and some zeros: every parameter and state entry stays finite."""
    magnitude = min(10.0**exponent, _finite_max(dtype))
    if magnitude == 0.0 or math.isinf(magnitude):
        pytest.skip("not representable")
    gen = torch.Generator().manual_seed(exponent + 100)
    shapes = [(7, 5), (5,), ()]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    opt = LSTMOptimizer(params, weights=weights)
    for _ in range(5):
        for p in params:
            signs = torch.randint(-1, 2, p.shape, generator=gen).to(torch.float64)
            p.grad = (signs * magnitude).clamp(-_finite_max(dtype), _finite_max(dtype)).to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no skipped step: every update here is finite
            opt.step()
        for p in params:
            assert torch.isfinite(p).all(), f"{weights} {dtype} 1e{exponent}: non-finite parameter"
    assert _state_finite(opt)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_a_single_spike_after_normal_steps_leaves_the_model_finite(weights) -> None:
    """A loss spike: normal gradients, one step at 1e30, normal again."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = LSTMOptimizer(model.parameters(), weights=weights)
    x = torch.randn(32, 6)
    for step in range(12):
        opt.zero_grad()
        loss = (model(x) - 1).pow(2).mean()
        loss.backward()
        if step == 5:
            for p in model.parameters():
                p.grad.mul_(1e30)
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert _state_finite(opt)
    assert torch.isfinite((model(x) - 1).pow(2).mean())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    weights=st.sampled_from(WEIGHTS),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    log_magnitudes=st.lists(st.floats(-38.0, 38.5), min_size=1, max_size=12),
)
def test_random_magnitudes_never_produce_non_finite_values(weights, dtype, log_magnitudes):
    p = torch.nn.Parameter(torch.ones(len(log_magnitudes), dtype=dtype))
    opt = LSTMOptimizer([p], weights=weights)
    grad = torch.tensor(
        [(-1) ** i * 10.0**m for i, m in enumerate(log_magnitudes)], dtype=torch.float64
    )
    grad = grad.clamp(-_finite_max(dtype), _finite_max(dtype)).to(dtype)
    for k in range(3):
        p.grad = grad.roll(k)
        opt.step()
    assert torch.isfinite(p).all() and _state_finite(opt)


@pytest.mark.parametrize("rule", [AdamRule(lr=0.01), SGDRule(lr=1e-3)])
def test_hand_designed_rules_stay_finite_at_the_largest_gradients(rule) -> None:
    p = torch.nn.Parameter(torch.ones(4))
    opt = LearnedOptimizer([p], rule)
    for _ in range(3):
        p.grad = torch.tensor([3e38, -3e38, 1e20, 0.0])
        opt.step()
    assert torch.isfinite(p).all() and _state_finite(opt)


class _NaNAfter(UpdateRule):
    """A test double: SGD whose update becomes NaN for coordinates whose gradient is exactly
    1234 (a finite gradient that a faulty rule turns into NaN)."""

    kind = "test-nan-after"

    def init_state(self, numel, *, like):
        return {"count": torch.zeros(numel, dtype=like.dtype)}

    def forward(self, grad, state):
        update = torch.where(grad == 1234.0, torch.full_like(grad, float("nan")), -0.1 * grad)
        return update, {"count": state["count"] + 1}

    def config(self):
        return {}


def test_non_finite_update_is_skipped_with_parameters_and_state_unchanged() -> None:
    good, bad = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = LearnedOptimizer([good, bad], _NaNAfter())
    good.grad, bad.grad = torch.ones(3), torch.ones(3)
    opt.step()
    before = bad.detach().clone(), opt.state[bad]["count"].clone()
    good.grad, bad.grad = torch.ones(3), torch.tensor([1.0, 1234.0, 1.0])
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert torch.equal(bad, before[0]) and torch.equal(opt.state[bad]["count"], before[1])
    assert torch.allclose(good, torch.full((3,), 0.8))  # the other tensor still stepped
    assert int(opt.state[good]["count"][0]) == 2


def test_non_finite_update_raise_policy_changes_nothing() -> None:
    first, bad = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = LearnedOptimizer([first, bad], _NaNAfter(), nonfinite="raise")
    first.grad, bad.grad = torch.ones(3), torch.full((3,), 1234.0)
    with pytest.raises(NonFiniteGradientError, match="no parameter was changed"):
        opt.step()
    # The first tensor's update was finite, but nothing is committed when a later one fails.
    assert torch.equal(first, torch.ones(3)) and torch.equal(bad, torch.ones(3))
    assert len(opt.state[first]) == 0 or int(opt.state[first]["count"][0]) == 0


def test_raise_leaves_the_in_place_steps_states_as_they_were() -> None:
    """A float32 tensor (stepped in place by the default rule) beside a float16 one whose new
    value leaves its range: the error comes before the float32 tensor's state changes."""
    a = torch.nn.Parameter(torch.linspace(-1, 1, 30).reshape(6, 5))
    b = torch.nn.Parameter(torch.full((4,), 60_000.0, dtype=torch.float16))
    opt = LSTMOptimizer([{"params": [a]}, {"params": [b]}], nonfinite="raise")

    def step() -> None:
        a.grad, b.grad = torch.ones_like(a), torch.full_like(b, -1.0)
        opt.step()

    step()
    before = a.detach().clone(), {k: v.clone() for k, v in opt.state[a].items()}
    opt.param_groups[1]["lr"] = 1e6
    with pytest.raises(NonFiniteGradientError, match="beyond the range"):
        step()
    assert torch.equal(a, before[0])
    for key, value in opt.state[a].items():
        assert torch.equal(value, before[1][key]), key


def test_a_rule_object_with_non_finite_weights_is_refused_before_any_step() -> None:
    rule, _ = load_rule(pretrained.path("general-v2"))
    with torch.no_grad():
        next(rule.parameters())[0] = float("nan")
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="weights are not finite"):
        LSTMOptimizer([p], weights=rule)


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
@pytest.mark.parametrize("n", [4, LSTMOptimizer.chunk_size + 1])  # (larger: checked in chunks)
def test_a_finite_update_that_takes_a_float16_parameter_past_its_range_changes_nothing(
    nonfinite: str, n: int
) -> None:
    """A float16 parameter's new value can leave its range (65,504) though the update (computed
    in float32) is finite, as a large ``lr`` does: that tensor is skipped or raised like a
    non-finite update, with its value and state unchanged; the other tensors step."""
    ok, far = (torch.nn.Parameter(torch.ones(n, dtype=torch.float16)) for _ in range(2))
    with torch.no_grad():
        far[0] = 60_000.0
    opt = LSTMOptimizer([{"params": [ok]}, {"params": [far]}], nonfinite=nonfinite)

    def step() -> None:
        ok.grad = far.grad = torch.full((n,), -1.0, dtype=torch.float16)
        opt.step()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step()  # at lr 1 the new values stay in range: applied
    assert (far[1:] > 1).all() and torch.isfinite(far).all()
    before = far.detach().clone(), {k: v.clone() for k, v in opt.state[far].items()}
    ok_before = ok.detach().clone()
    opt.param_groups[1]["lr"] = 1e7
    if nonfinite == "raise":
        with pytest.raises(NonFiniteGradientError, match="beyond the range of torch.float16"):
            step()
        assert torch.equal(ok, ok_before)
    else:
        with pytest.warns(RuntimeWarning, match="skipped the update of 1 parameter"):
            step()
        assert (ok > ok_before).all() and torch.isfinite(ok).all()  # stepped
    assert torch.equal(far, before[0])
    for key, value in opt.state[far].items():
        assert torch.equal(value, before[1][key]), key
