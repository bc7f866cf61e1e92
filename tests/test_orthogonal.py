"""Muon's orthogonalized direction for matrix-shaped parameters (``orthogonal=True``)."""

from __future__ import annotations

import io

import pytest
import torch

from learned_opt import LearnedOptimizer, LSTMOptimizer, load_rule, save_rule
from learned_opt.rules import LSTMCorrectedAdamRule, ScheduledRule
from learned_opt.rules.orthogonal import orthogonal_direction, orthogonalize


@pytest.mark.parametrize("shape", [(16, 16), (64, 8), (8, 64), (1, 30)])
def test_orthogonalize_equalizes_singular_values(shape: tuple[int, int]) -> None:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    g = g * torch.logspace(-0.5, 0.5, shape[1])  # columns spanning a decade
    s = torch.linalg.svdvals(orthogonalize(g))
    assert float(s.min()) > 0.6 and float(s.max()) < 1.25
    flat = orthogonal_direction(g.reshape(-1), *shape)
    rms = float(flat.pow(2).mean().sqrt())
    assert 0.2 * 0.6 < rms < 0.2 * 1.25  # about Adam's, whatever the shape


def test_orthogonalize_refuses_a_vector() -> None:
    with pytest.raises(ValueError, match="matrix"):
        orthogonalize(torch.ones(4))


def _plain_rule(**changes: object) -> LSTMCorrectedAdamRule:
    """The rule's direction alone: zero read-out, no adaptation or clipping, base rate 1."""
    return LSTMCorrectedAdamRule(lr=1.0, lr_adapt=0.0, grad_clip=0.0, **changes)


def test_matrices_take_muons_direction_and_vectors_adams() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(6, 2, 3))
    b = torch.nn.Parameter(torch.zeros(6))
    opt = LearnedOptimizer([w, b], _plain_rule(orthogonal=True), lr=0.1)
    gw, gb = torch.randn(6, 2, 3), torch.randn(6)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    # step 1: the Nesterov momentum is a multiple of the gradient, and orthogonalizing ignores it
    expected = -0.1 * orthogonal_direction(gw.reshape(-1), 6, 6).view(6, 2, 3)
    assert torch.allclose(w.detach(), expected, atol=1e-5)
    assert torch.allclose(b.detach(), -0.1 * gb.sign(), atol=1e-5)  # Adam's first step
    assert opt.state[w]["matrix"].tolist() == [6, 6] and "matrix" not in opt.state[b]
    # and not Adam's direction on the matrix (that is the rule without the option)
    w2 = torch.nn.Parameter(torch.zeros(6, 2, 3))
    plain = LearnedOptimizer([w2], _plain_rule(), lr=0.1)
    w2.grad = gw.clone()
    plain.step()
    assert not torch.allclose(w.detach(), w2.detach(), atol=1e-3)


def test_the_option_is_saved_and_survives_a_schedule(tmp_path) -> None:
    base = LSTMCorrectedAdamRule(orthogonal=True)
    rule = ScheduledRule(base.kind, base.config(), warmup=0.1)
    path = tmp_path / "w.pt"
    save_rule(path, rule, {"source": "test"})
    loaded, _ = load_rule(path)
    assert loaded.reads_shape and loaded.base.settings.orthogonal
    w = torch.nn.Parameter(torch.ones(4, 5))
    opt = LSTMOptimizer([w], weights=loaded, total_steps=10)
    w.grad = torch.randn(4, 5)
    opt.step()
    assert opt.state[w]["matrix"].tolist() == [4, 5]


def test_optimizer_state_round_trips_through_a_safe_load() -> None:
    torch.manual_seed(1)
    rule = LSTMCorrectedAdamRule(orthogonal=True)
    model = torch.nn.Linear(5, 3)
    opt = LSTMOptimizer(model.parameters(), weights=rule)
    x = torch.randn(16, 5)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = torch.nn.Linear(5, 3)
    twin.load_state_dict(saved["model"])
    opt2 = LSTMOptimizer(twin.parameters(), weights=rule)
    opt2.load_state_dict(saved["opt"])
    for m, o in ((model, opt), (twin, opt2)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
        o.step()
    assert torch.equal(model.weight, twin.weight) and torch.equal(model.bias, twin.bias)


def test_a_flat_vector_of_several_tensors_is_refused() -> None:
    rule = LSTMCorrectedAdamRule(orthogonal=True)
    with pytest.raises(ValueError, match="one state per tensor"):
        rule.init_state(10, like=torch.zeros(10), numels=[4, 6])


def test_orthogonal_needs_the_nominal_direction() -> None:
    with pytest.raises(ValueError, match="nominal"):
        LSTMCorrectedAdamRule(orthogonal=True, nominal=False)


@pytest.mark.parametrize("rms", [False, True])
def test_the_fused_step_takes_the_forwards_orthogonal_direction(rms: bool) -> None:
    """The drop-in optimizer's fused step (the kernel given the orthogonalized direction) and
    the rule's forward agree over several steps, clipping and adaptation included."""
    from learned_opt import kernels
    from learned_opt.rules import corrected_adam_step

    if kernels._load_corrected_adam() is None:
        pytest.skip("the fused kernel is not available here")
    torch.manual_seed(2)
    rule = LSTMCorrectedAdamRule(orthogonal=True, orthogonal_rms=rms, beta1=0.8)
    with torch.no_grad():
        rule.out_weight.normal_(0, 0.5)  # a read-out that matters
    fused = rule.init_state(40, like=torch.zeros(40), shape=(8, 5))
    plain = {k: v.clone() for k, v in fused.items()}
    assert corrected_adam_step._fused_ok(rule, torch.zeros(40), fused)
    for step in range(6):
        g = torch.randn(40) * (10.0 if step == 3 else 1.0)  # a spike: the clipping acts
        got = corrected_adam_step.step_(rule, g.clone(), fused)
        want, plain = rule(g.clone(), plain)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fused["prev"], plain["prev"], rtol=1e-5, atol=1e-7)
