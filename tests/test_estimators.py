"""Meta-gradient estimators: TBPTT reproduces the trainer; PES and antithetic ES agree with the
backpropagated gradient on a tiny problem; PES accumulates its perturbations across windows,
resets them at the end of the unroll, and never builds a graph."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from learned_opt import MetaTrainConfig, MetaTrainer
from learned_opt.evaluate import task_seed
from learned_opt.learners import OptimizerLearner
from learned_opt.outer import UnrollSpec, meta_train_iteration, unroll
from learned_opt.outer.estimators import (
    ESTIMATORS,
    MetaGradient,
    PESEstimator,
    TBPTTEstimator,
    average_gradients,
    build_estimator,
    clip_estimate,
    meta_parameters,
)
from learned_opt.outer.rounds import take_rounds
from learned_opt.rules import GeneralLSTMRule, build_rule
from learned_opt.rules.base import RuleState, UpdateRule
from learned_opt.tasks import QuadraticFamily, make_family


class MomentumLR(UpdateRule):
    """``update = -exp(log_lr) * (g + w * m)``, ``m <- 0.5 m + g``: two meta-parameters."""

    kind = "test-momentum-lr"

    def __init__(self) -> None:
        super().__init__()
        self.log_lr = nn.Parameter(torch.tensor(math.log(0.02), dtype=torch.float64))
        self.w = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def init_state(self, numel: int, *, like: Tensor) -> RuleState:
        return {"m": torch.zeros(numel, dtype=like.dtype)}

    def forward(self, grad: Tensor, state: RuleState) -> tuple[Tensor, RuleState]:
        m = 0.5 * state["m"] + grad
        return -torch.exp(self.log_lr) * (grad + self.w * m), {"m": m}

    def config(self) -> dict:
        return {}


@pytest.fixture
def quadratic():
    return QuadraticFamily(dim=3, dtype=torch.float64).sample(torch.Generator().manual_seed(0))


def _true_gradient(rule: UpdateRule, task, horizon: int, objective: str = "train") -> Tensor:
    """Full backpropagation (second order, no truncation) of the meta-loss (default: the mean
    training loss)."""
    learner = OptimizerLearner(rule, second_order=True)
    gen = torch.Generator().manual_seed(1)
    spec = UnrollSpec(horizon, horizon, objective=objective)
    (window,) = list(unroll(learner, task, gen, spec))
    return torch.stack(torch.autograd.grad(window.meta_loss, list(rule.parameters())))


def _cosine(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_pes_agrees_with_backpropagation_over_the_whole_unroll(quadratic) -> None:
    """Two truncation windows: the mean of PES's window estimates estimates the gradient of the
    whole unroll's (smoothed) meta-loss, including how window 1 shapes window 2's losses."""
    rule = MomentumLR()
    true = _true_gradient(rule, quadratic, horizon=6)
    est = PESEstimator(sigma=0.01, pairs=120)
    g = est.meta_gradient(
        OptimizerLearner(rule), quadratic, torch.Generator().manual_seed(1), UnrollSpec(6, 3)
    )
    pes = torch.stack(g.grads)
    assert _cosine(pes, true) > 0.9
    assert float((pes - true).norm() / true.norm()) < 0.35
    assert g.info == {"windows": 2, "usable_windows": 2}
    # the reported meta-loss is that of the unperturbed unroll, up to O(sigma^2)
    learner = OptimizerLearner(rule)
    (ref,) = list(
        unroll(
            learner,
            quadratic,
            torch.Generator().manual_seed(1),
            horizon=6,
            truncation=6,
            differentiable=False,
        )
    )
    assert abs(g.meta_loss - float(ref.meta_loss)) < 1e-3 * float(ref.meta_loss)


def test_antithetic_es_agrees_with_backpropagation_on_one_window(quadratic) -> None:
    rule = MomentumLR()
    true = _true_gradient(rule, quadratic, horizon=4)
    for estimator in (build_estimator("es", sigma=0.01, pairs=120), PESEstimator(0.01, 120)):
        g = estimator.meta_gradient(
            OptimizerLearner(rule),
            quadratic,
            torch.Generator().manual_seed(1),
            UnrollSpec(4, 4),
        )
        assert _cosine(torch.stack(g.grads), true) > 0.9


@pytest.mark.parametrize("objective", ["test", "final-train"])
def test_pes_scores_the_end_of_each_window_like_unroll(quadratic, objective: str) -> None:
    """The objectives that score a window's end on one batch (held-out, or a fresh training
    batch) run under PES too, and agree with backpropagation."""
    rule = MomentumLR()
    true = _true_gradient(rule, quadratic, horizon=4, objective=objective)
    g = PESEstimator(0.01, 120).meta_gradient(
        OptimizerLearner(rule),
        quadratic,
        torch.Generator().manual_seed(1),
        UnrollSpec(4, 4, objective=objective),
    )
    assert _cosine(torch.stack(g.grads), true) > 0.9


def test_tbptt_estimator_matches_backpropagation_of_each_window(quadratic) -> None:
    rule = MomentumLR()
    learner = OptimizerLearner(rule, second_order=True)
    windows = list(
        unroll(learner, quadratic, torch.Generator().manual_seed(1), horizon=6, truncation=3)
    )
    expected = []
    for w in windows:
        expected.append(torch.stack(torch.autograd.grad(w.meta_loss, list(rule.parameters()))))
    got = TBPTTEstimator().meta_gradient(
        learner, quadratic, torch.Generator().manual_seed(1), UnrollSpec(6, 3)
    )
    torch.testing.assert_close(torch.stack(got.grads), sum(expected) / 2)


def test_tbptt_with_gradient_checkpointing_gives_the_same_estimate(quadratic) -> None:
    learner = OptimizerLearner(MomentumLR(), second_order=True)
    grads = [
        torch.stack(
            TBPTTEstimator(checkpoint_segment=segment)
            .meta_gradient(learner, quadratic, torch.Generator().manual_seed(1), UnrollSpec(8, 4))
            .grads
        )
        for segment in (None, 2)
    ]
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("per_task", [False, True])
def test_tbptt_iteration_reproduces_the_meta_trainer(per_task: bool) -> None:
    """meta_train_iteration with TBPTT streams takes exactly the trainer's meta-steps, with and
    without per-task clipping (a clipping norm small enough to bind)."""
    config = MetaTrainConfig(
        family="quadratic",
        rule="general-lstm",
        rule_kwargs={"hidden_size": 4},
        horizon=6,
        truncation=2,
        meta_batch=2,
        iterations=1,
        eval_every=0,
        meta_lr=1e-2,
        clip_grad=1e-3 if per_task else 1.0,
        clip_grad_per_task=per_task,
    )
    trainer = MetaTrainer(config)
    trainer.train_iteration()
    rule = build_rule(config.rule, config.rule_kwargs)
    rule.reset_parameters(torch.Generator().manual_seed(config.seed))
    learner = OptimizerLearner(rule)
    meta_opt = torch.optim.Adam(learner.parameters(), lr=config.meta_lr)
    family = make_family("quadratic")
    streams = []
    for j in range(config.meta_batch):
        seed = task_seed(config.seed, 0, j)
        streams.append(
            TBPTTEstimator().unroll(
                learner,
                family.sample(torch.Generator().manual_seed(seed)),
                torch.Generator().manual_seed(seed + 1),
                UnrollSpec(config.horizon, config.truncation, max_loss_ratio=config.max_loss_ratio),
            )
        )
    stats = meta_train_iteration(
        learner,
        meta_opt,
        streams,
        clip_grad=config.clip_grad,
        clip_each=config.clip_grad if per_task else 0.0,
    )
    assert stats["rounds"] == 3 and stats["skipped"] == 0
    mine, theirs = learner.state_dict(), trainer.learner.state_dict()
    for k in theirs:
        torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=1e-7)
    start = build_rule(config.rule, config.rule_kwargs)
    start.reset_parameters(torch.Generator().manual_seed(config.seed))
    assert not torch.equal(start.out_weight, rule.out_weight)  # it did move


def test_pes_accumulates_perturbations_and_resets_at_the_end(quadratic) -> None:
    rule = MomentumLR()
    learner = OptimizerLearner(rule)
    stream = PESEstimator(sigma=0.1, pairs=3).unroll(
        learner, quadratic, torch.Generator().manual_seed(1), UnrollSpec(7, 3)
    )
    # reproduce the stream's noise: one draw of the generator after the inner-state draw
    gen = torch.Generator().manual_seed(1)
    learner.init_state(quadratic, gen)
    noise = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    total = torch.zeros(3, 2, dtype=torch.float64)
    windows = []
    for k, window in enumerate(stream):
        eps = 0.1 * torch.randn(3, 2, generator=noise, dtype=torch.float64)
        total = total + eps
        windows.append((window.start, window.end))
        if k < 2:
            torch.testing.assert_close(stream.xi, total)  # accumulated over the windows
            assert all(s is not None for s in stream.states)
        else:  # the unroll is over: state released, accumulation reset
            assert torch.equal(stream.xi, torch.zeros(3, 2, dtype=torch.float64))
            assert all(s is None for s in stream.states)
    assert windows == [(0, 3), (3, 6), (6, 7)]
    # truncated ES: no accumulation
    es = PESEstimator(sigma=0.1, pairs=3, persistent=False).unroll(
        learner, quadratic, torch.Generator().manual_seed(1), UnrollSpec(6, 3)
    )
    next(es)
    first = es.xi.clone()
    next(es)
    assert not torch.equal(es.xi, first)


@pytest.mark.parametrize("kwargs", [{}, {"lr_adapt": 0.1}])
def test_pes_builds_no_graph_and_restores_theta(kwargs: dict) -> None:
    task = QuadraticFamily(dim=6).sample(torch.Generator().manual_seed(0))
    rule = GeneralLSTMRule(hidden_size=4, lr=0.05, **kwargs)
    rule.reset_parameters(torch.Generator().manual_seed(0), zero_output=False)
    learner = OptimizerLearner(rule)
    theta = [p.detach().clone() for p in meta_parameters(learner)]
    stream = PESEstimator(sigma=0.01, pairs=2).unroll(
        learner, task, torch.Generator().manual_seed(1), UnrollSpec(6, 2, objective="test")
    )
    for window in stream:
        for state in (s for s in stream.states if s is not None):
            assert state.params.grad_fn is None  # a leaf: no graph behind the inner state
            assert not any(v.requires_grad for v in state.rule_state.values())
        assert window.grads is not None and all(torch.isfinite(g).all() for g in window.grads)
        assert [g.shape for g in window.grads] == [p.shape for p in meta_parameters(learner)]
        assert window.train_losses.shape == (2,) and math.isfinite(window.meta_loss)
        for p, t in zip(meta_parameters(learner), theta):
            assert torch.equal(p, t) and p.grad is None


def test_pes_drops_and_restarts_diverging_pairs(quadratic) -> None:
    rule = MomentumLR()
    with torch.no_grad():
        rule.log_lr.fill_(math.log(5.0))  # explodes on this quadratic
    stream = PESEstimator(sigma=0.01, pairs=2).unroll(
        OptimizerLearner(rule),
        quadratic,
        torch.Generator().manual_seed(1),
        UnrollSpec(6, 3, max_loss_ratio=10.0),
    )
    window = next(stream)
    assert window.grads is None and window.diverged and window.info["pairs_diverged"] == 2
    assert next(stream, None) is None


def test_average_gradients_and_registry() -> None:
    z = torch.zeros(0)
    a = MetaGradient([torch.ones(2), None], 1.0, z, 0, 1)
    b = MetaGradient([3 * torch.ones(2), None], 2.0, z, 0, 1)
    c = MetaGradient(None, math.nan, z, 0, 1)
    avg = average_gradients([a, b, c])
    torch.testing.assert_close(avg[0], 2 * torch.ones(2))
    assert avg[1] is None and average_gradients([c]) is None
    assert set(ESTIMATORS) == {"tbptt", "pes", "es"}
    assert build_estimator("es").persistent is False
    assert build_estimator("pes", pairs=3).config()["pairs"] == 3
    with pytest.raises(ValueError):
        build_estimator("reinforce")


def test_clip_estimate_scales_only_gradients_above_the_norm() -> None:
    z = torch.zeros(0)
    big = MetaGradient([torch.tensor([3.0, 0.0]), None, torch.tensor([4.0])], 1.0, z, 0, 1)
    clipped = clip_estimate(big, 1.0)
    norm = torch.cat([clipped.grads[0], clipped.grads[2]]).norm()
    assert norm == pytest.approx(1.0, rel=1e-5) and clipped.grads[1] is None
    torch.testing.assert_close(clipped.grads[0] * 5, torch.tensor([3.0, 0.0]), rtol=1e-5, atol=0)
    assert clipped.meta_loss == 1.0 and big.grads[0][0] == 3.0  # a copy; the input is kept
    small = MetaGradient([torch.tensor([0.3])], 1.0, z, 0, 1)
    nonfinite = MetaGradient([torch.tensor([math.inf])], 1.0, z, 0, 1)
    unusable = MetaGradient(None, math.nan, z, 0, 1)
    for e in (small, nonfinite, unusable):
        assert clip_estimate(e, 1.0) is e


def test_per_task_clipping_keeps_one_task_from_steering_the_step() -> None:
    """A chaotic task's gradient (norm 1e4) dominates the plain mean; clipped per task first,
    the two tasks weigh alike."""
    z = torch.zeros(0)

    def streams():
        chaotic = MetaGradient([torch.tensor([1e4, 0.0])], 0.0, z, 0, 1)
        calm = MetaGradient([torch.tensor([0.0, 1.0])], 0.0, z, 0, 1)
        return [iter([chaotic]), iter([calm])]

    taken: list[Tensor] = []

    def step(grads, loss, count):
        taken.append(grads[0])
        return float(grads[0].norm()), True

    take_rounds(streams(), step)
    take_rounds(streams(), step, clip_each=1.0)
    plain, clipped = taken
    assert plain[1] / plain[0] < 1e-3
    torch.testing.assert_close(clipped, torch.tensor([0.5, 0.5]), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="clip_grad_per_task"):
        MetaTrainConfig(clip_grad=0.0, clip_grad_per_task=True)


@pytest.mark.parametrize("objective", ["train", "test"])
@pytest.mark.parametrize("segment", [None, 2])
def test_loss_averse_objective_is_the_weighted_log_ratio_to_the_reference(
    quadratic, objective: str, segment
) -> None:
    """Each window's meta-loss is log(L / L_ref), times 1 + lambda where positive, with L and
    L_ref what plain unrolls of the two rules give on the same batches (copies of the task:
    the same batch stream); the gradient is that weight times the gradient of log L; and a
    reference identical to the learner gives exactly zero."""
    import copy

    learner = OptimizerLearner(MomentumLR(), second_order=True)
    faster = MomentumLR()
    with torch.no_grad():
        faster.log_lr.fill_(math.log(0.05))
    spec = UnrollSpec(6, 3, objective=objective, log_meta_loss=True)
    signs = set()
    for ref_rule, lam in ((faster, 2.0), (MomentumLR(), 3.0), (copy.deepcopy(faster), 0.0)):
        reference = OptimizerLearner(ref_rule)
        reference.requires_grad_(False)
        plain = list(
            unroll(learner, copy.deepcopy(quadratic), torch.Generator().manual_seed(1), spec)
        )
        ref = list(
            unroll(
                reference,
                copy.deepcopy(quadratic),
                torch.Generator().manual_seed(1),
                spec,
                differentiable=False,
            )
        )
        got = list(
            TBPTTEstimator(checkpoint_segment=segment).unroll(
                learner,
                copy.deepcopy(quadratic),
                torch.Generator().manual_seed(1),
                spec.replace(loss_aversion=lam),
                reference=reference,
            )
        )
        assert len(got) == len(plain) == 2
        for g, p, r in zip(got, plain, ref):
            ratio = float(p.meta_loss.detach()) - float(r.meta_loss)
            weight = 1.0 + lam if ratio > 0 else 1.0
            signs.add(ratio > 0)
            assert g.meta_loss == pytest.approx(weight * ratio, rel=1e-9, abs=1e-12)
            expected = torch.autograd.grad(p.meta_loss, list(learner.rule.parameters()))
            torch.testing.assert_close(
                torch.stack(g.grads), weight * torch.stack(expected), rtol=1e-7, atol=1e-12
            )
    assert signs == {True, False}  # windows worse and better than the reference: both weights
    # identical rules: the log-ratio is exactly zero
    same = OptimizerLearner(copy.deepcopy(learner.rule))
    for g in TBPTTEstimator(checkpoint_segment=segment).unroll(
        learner,
        quadratic,
        torch.Generator().manual_seed(1),
        spec.replace(loss_aversion=5.0),
        reference=same,
    ):
        assert g.meta_loss == 0.0


def test_loss_averse_objective_refuses_what_it_cannot_do(quadratic) -> None:
    learner = OptimizerLearner(MomentumLR())
    reference = OptimizerLearner(MomentumLR())
    spec = UnrollSpec(4, 2)
    with pytest.raises(ValueError, match="log_meta_loss"):
        next(
            TBPTTEstimator().unroll(
                learner, quadratic, torch.Generator(), spec, reference=reference
            )
        )
    with pytest.raises(ValueError, match="loss_aversion"):
        spec.replace(log_meta_loss=True, loss_aversion=-1)
    with pytest.raises(ValueError, match="reference"):
        PESEstimator().unroll(
            learner,
            quadratic,
            torch.Generator(),
            spec.replace(log_meta_loss=True),
            reference=reference,
        )


def test_meta_loss_floor_adds_a_share_of_the_first_loss_inside_the_log(quadratic) -> None:
    """``meta_loss_floor=F``: the window's meta-loss is ``log(L + F L_1)`` (``L_1`` the unroll's
    first training loss) under backpropagation, and PES estimates its gradient; it needs the
    log meta-loss and refuses a negative or non-finite floor."""
    rule = MomentumLR()
    learner = OptimizerLearner(rule, second_order=True)
    spec = UnrollSpec(4, 4, objective="final-train", log_meta_loss=True)
    (plain,) = list(unroll(learner, quadratic, torch.Generator().manual_seed(1), spec))
    floored_spec = spec.replace(meta_loss_floor=0.5)
    (floored,) = list(unroll(learner, quadratic, torch.Generator().manual_seed(1), floored_spec))
    first = float(floored.train_losses[0])
    expected = math.log(math.exp(float(plain.meta_loss.detach())) + 0.5 * first)
    assert float(floored.meta_loss.detach()) == pytest.approx(expected, rel=1e-9)
    true = torch.stack(torch.autograd.grad(floored.meta_loss, list(rule.parameters())))
    g = PESEstimator(0.01, 120).meta_gradient(
        OptimizerLearner(rule), quadratic, torch.Generator().manual_seed(1), floored_spec
    )
    assert _cosine(torch.stack(g.grads), true) > 0.9
    unfloored = PESEstimator(0.01, 120).meta_gradient(
        OptimizerLearner(rule), quadratic, torch.Generator().manual_seed(1), spec
    )
    assert not torch.allclose(torch.stack(g.grads), torch.stack(unfloored.grads))
    # against a reference (the loss-averse objective) both sides are floored alike: a rule
    # scored against itself has a zero meta-loss
    same = OptimizerLearner(MomentumLR())
    gen = torch.Generator().manual_seed(1)
    (window,) = list(unroll(same, quadratic, gen, floored_spec, reference=same))
    assert float(window.meta_loss.detach()) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="log_meta_loss"):
        UnrollSpec(4, 4, meta_loss_floor=0.1)
    with pytest.raises(ValueError, match="meta_loss_floor"):
        spec.replace(meta_loss_floor=-0.1)
    with pytest.raises(ValueError, match="log_meta_loss"):
        MetaTrainConfig(family="quadratic", meta_loss_floor=0.1)
    config = MetaTrainConfig(family="quadratic", log_meta_loss=True, meta_loss_floor=0.1)
    assert config.unroll_spec().meta_loss_floor == 0.1
