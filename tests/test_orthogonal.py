"""Muon's orthogonalized direction for matrix-shaped parameters (``orthogonal=True``)."""

from __future__ import annotations

import io
import math

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


def test_a_flat_vector_of_several_tensors_needs_their_shapes() -> None:
    rule = LSTMCorrectedAdamRule(orthogonal=True)
    with pytest.raises(ValueError, match="needs their shapes"):
        rule.init_state(10, like=torch.zeros(10), numels=[4, 6])
    with pytest.raises(ValueError, match="do not match"):
        rule.init_state(10, like=torch.zeros(10), numels=[4, 6], shapes=[(2, 2), (5,)])


SHAPES = [(8, 5), (5,), (3, 4, 2), (7,), (0, 3)]


def _mixing_rule(weight: float, bias: float) -> LSTMCorrectedAdamRule:
    rule = LSTMCorrectedAdamRule(orthogonal=True, orthogonal_rms=True, orthogonal_mix=True)
    with torch.no_grad():
        rule.out_weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
        rule.mix_weight.fill_(weight)
        rule.mix_bias.fill_(bias)
    return rule


@pytest.mark.parametrize("mix", [(0.0, 0.0), (0.7, -0.3)])
def test_a_flat_vector_of_several_tensors_steps_as_its_tensors_would(mix) -> None:
    """A meta-learner's flat state (the tensors' shapes given) and one state per tensor (the
    drop-in optimizer's) give the same updates: Muon's direction per matrix, the mix per tensor."""
    rule = _mixing_rule(*mix)
    numels = [math.prod(s) for s in SHAPES]
    n = sum(numels)
    flat = rule.init_state(n, like=torch.zeros(n), numels=numels, shapes=SHAPES)
    assert flat["matrices"].tolist() == [[0, 8, 5], [45, 3, 8]]  # the empty matrix has none
    per = [rule.init_state(k, like=torch.zeros(k), shape=s) for k, s in zip(numels, SHAPES)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        g = torch.randn(n, generator=gen)
        got, flat = rule(g, flat)
        want = []
        for i, gi in enumerate(g.split(numels)):
            ui, per[i] = rule(gi, per[i])
            want.append(ui)
        torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-8)


def test_the_mix_moves_matrices_between_muons_direction_and_adams() -> None:
    """At zero the mix read-out gives Muon's direction (the rule without the mix); saturated
    towards 1, Adam's (the rule without ``orthogonal``)."""
    g = torch.randn(5, 40, generator=torch.Generator().manual_seed(1))

    def updates(rule: LSTMCorrectedAdamRule) -> list[torch.Tensor]:
        state = rule.init_state(40, like=torch.zeros(40), shape=(8, 5))
        out = []
        for gi in g:
            u, state = rule(gi, state)
            out.append(u)
        return out

    muon = _mixing_rule(0.0, 0.0)
    adam = _mixing_rule(0.0, 30.0)  # tanh(30) = 1
    for mixed, plain in ((muon, muon.variant(orthogonal_mix=False)),
                         (adam, adam.variant(orthogonal=False, orthogonal_rms=False,
                                             orthogonal_mix=False))):  # fmt: skip
        for got, want in zip(updates(mixed), updates(plain)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


def test_the_mix_needs_orthogonal_and_the_drop_in_step_matches_the_forward() -> None:
    with pytest.raises(ValueError, match="orthogonal_mix"):
        LSTMCorrectedAdamRule(orthogonal_mix=True)
    rule = _mixing_rule(0.7, -0.3)
    w = torch.nn.Parameter(torch.zeros(8, 5))
    opt = LearnedOptimizer([w], rule, lr=0.1)
    state = rule.init_state(40, like=torch.zeros(40), shape=(8, 5))
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        g = torch.randn(8, 5, generator=gen)
        w.grad = g.clone()
        before = w.detach().clone()
        opt.step()
        want, state = rule(g.reshape(-1), state)
        torch.testing.assert_close((w.detach() - before).reshape(-1), 0.1 * want)


def test_the_mix_alone_is_learnable_and_zeroed_with_the_read_out() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from sealed_optimizers import zero_readout

    base = LSTMCorrectedAdamRule(orthogonal=True, orthogonal_mix=True, learn_lstm=False)
    rule = ScheduledRule(base.kind, base.config(), learn_schedule=False)
    learnable = [n for n, p in rule.named_parameters() if p.requires_grad]
    assert learnable == ["base.mix_weight", "base.mix_bias"]
    assert rule.config()["learn_schedule"] is False
    with torch.no_grad():
        rule.base.mix_bias.fill_(1.0)
    zeroed = zero_readout(rule)
    assert float(zeroed.base.mix_bias.detach()) == 0.0
    assert float(rule.base.mix_bias.detach()) == 1.0


def test_a_meta_learner_unrolls_the_orthogonal_direction() -> None:
    """The learned-optimizer meta-learner gives the rule its tensors' shapes: one inner step on
    a task with matrices runs, and moves them along Muon's direction."""
    from learned_opt.learners import OptimizerLearner
    from learned_opt.tasks import make_family

    task = make_family("meta-train").sample(torch.Generator().manual_seed(0))
    learner = OptimizerLearner(LSTMCorrectedAdamRule(orthogonal=True, orthogonal_rms=True))
    state = learner.init_state(task, torch.Generator().manual_seed(0))
    assert state.rule_state["matrices"].shape[0] >= 1
    batch = task.train.sample()
    new, loss = learner.step(task, state, batch, differentiable=False)
    assert torch.isfinite(loss) and not torch.equal(new.params, state.params)


def test_orthogonal_needs_the_nominal_direction() -> None:
    with pytest.raises(ValueError, match="nominal"):
        LSTMCorrectedAdamRule(orthogonal=True, nominal=False)


@pytest.mark.parametrize("rms", [False, True])
def test_the_fused_step_takes_the_forwards_orthogonal_direction(rms: bool) -> None:
    """The drop-in optimizer's fused step (the kernel given the orthogonalized direction) and
    the rule's forward agree over several steps, clipping and adaptation included (to 1e-3:
    a relative 1e-7 change of the gradients moves the steps by up to 2e-5 relative, through
    the Newton-Schulz iterations' matrix products, which round by instruction set)."""
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
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(fused["prev"], plain["prev"], rtol=1e-3, atol=1e-6)
