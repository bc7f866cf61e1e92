"""The meta-learner contract, over the learned optimizer, MAML and the recurrent learner."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from learned_opt import LSTMRule
from learned_opt.learners import MAMLLearner, MetaLearner, OptimizerLearner, RNNLearner
from learned_opt.outer import MetaTrainConfig, MetaTrainer, run_inner, unroll
from learned_opt.tasks import DigitsFewShotFamily, SinusoidFamily, Task, TaskFamily


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one thread is much faster than two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


FAMILIES: dict[str, Callable[[], TaskFamily]] = {
    "sinusoid": lambda: SinusoidFamily(k_shot=5, n_query=10),
    "digits": lambda: DigitsFewShotFamily(n_way=3, k_shot=2, n_query=4),
}


def _lstm_opt(family: TaskFamily) -> MetaLearner:
    rule = LSTMRule(hidden_size=8)
    rule.reset_parameters(torch.Generator().manual_seed(0))
    return OptimizerLearner(rule)


def _lstm_opt_init(family: TaskFamily) -> MetaLearner:
    rule = LSTMRule(hidden_size=8)
    rule.reset_parameters(torch.Generator().manual_seed(0))
    return OptimizerLearner(rule, init_model=family.model)


def _lstm_opt_steps(family: TaskFamily) -> MetaLearner:
    rule = LSTMRule(hidden_size=8)
    rule.reset_parameters(torch.Generator().manual_seed(0))
    return OptimizerLearner(rule, init_model=family.model, step_sizes="tensor")


def _maml(family: TaskFamily) -> MetaLearner:
    return MAMLLearner(family.model, inner_lr=0.05)


def _rnn(family: TaskFamily) -> MetaLearner:
    x, y = family.sample(torch.Generator().manual_seed(0)).train.full()
    y_dim = y.shape[1] if y.is_floating_point() else family.n_way
    return RNNLearner(x.shape[1], y_dim, hidden=16, head_hidden=16)


def _rnn_bilinear(family: TaskFamily) -> MetaLearner:
    x, y = family.sample(torch.Generator().manual_seed(0)).train.full()
    y_dim = y.shape[1] if y.is_floating_point() else family.n_way
    encoder = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 6), torch.nn.ReLU())
    return RNNLearner(x.shape[1], y_dim, hidden=16, head="bilinear", pairs="outer", encoder=encoder)


LEARNERS: dict[str, Callable[[TaskFamily], MetaLearner]] = {
    "lstm-opt": _lstm_opt,
    "lstm-opt-init": _lstm_opt_init,
    "lstm-opt-steps": _lstm_opt_steps,
    "maml": _maml,
    "rnn": _rnn,
    "rnn-bilinear": _rnn_bilinear,
}


def _depends_on_theta(learner: MetaLearner, task: Task, state: Any) -> bool:
    """Whether any of phi (other than theta's own tensors) is a function of theta."""
    theta = list(learner.parameters())
    ids = {id(p) for p in theta}
    phi = [t for t in learner.params_of(task, state).values() if id(t) not in ids]
    phi = [t for t in phi if t.requires_grad]
    if not phi:
        return False
    total = sum(t.sum() for t in phi)
    grads = torch.autograd.grad(total, theta, allow_unused=True, retain_graph=True)
    return any(g is not None for g in grads)


@pytest.mark.parametrize("family_name", list(FAMILIES))
@pytest.mark.parametrize("learner_name", list(LEARNERS))
def test_contract(learner_name: str, family_name: str) -> None:
    family = FAMILIES[family_name]()
    learner = LEARNERS[learner_name](family)
    task = family.sample(torch.Generator().manual_seed(1))
    theta = dict(learner.named_parameters())
    # Two truncation windows: the second must backpropagate after the first one's graph is gone.
    windows = list(
        unroll(
            learner,
            task,
            torch.Generator().manual_seed(2),
            horizon=4,
            truncation=2,
            objective="test",
        )
    )
    assert [(w.start, w.end) for w in windows] == [(0, 2), (2, 4)]
    assert _depends_on_theta(learner, task, windows[-1].state)
    for k, w in enumerate(windows):
        assert w.meta_loss is not None and w.meta_loss.dim() == 0
        assert torch.isfinite(w.meta_loss) and w.meta_loss.requires_grad
        assert torch.isfinite(w.train_losses).all() and len(w.train_losses) == 2
        learner.zero_grad(set_to_none=True)
        w.meta_loss.backward()
        grads = {n: p.grad for n, p in theta.items()}
        assert all(g is None or torch.isfinite(g).all() for g in grads.values())
        if k == 0:  # later windows start from a detached state (MAML's init gets no gradient)
            assert all(g is not None for g in grads.values()), grads
        assert sum(float(g.abs().sum()) for g in grads.values() if g is not None) > 0

    state = learner.detach_state(windows[-1].state)
    assert not _depends_on_theta(learner, task, state)
    # Evaluating a detached state still works and only reaches theta through the learner itself.
    loss = learner.evaluate(task, state, task.test.full())
    assert torch.isfinite(loss)

    # Without meta-gradients the same unroll builds no graph.
    losses, final = run_inner(learner, task, torch.Generator().manual_seed(2), 3)
    assert len(losses) == 3 and not losses.requires_grad
    with torch.no_grad():
        assert torch.isfinite(learner.evaluate(task, final, task.test.full()))
    assert not _depends_on_theta(learner, task, final)


def _maml_setup(first_order: bool = False, family: TaskFamily | None = None):
    family = family or SinusoidFamily(k_shot=5, n_query=10)
    learner = MAMLLearner(family.model, inner_lr=0.05, first_order=first_order)
    return learner, family.sample(torch.Generator().manual_seed(0))


def _maml_meta_grad(first_order: bool) -> torch.Tensor:
    learner, task = _maml_setup(first_order)
    (window,) = unroll(learner, task, torch.Generator(), horizon=3, truncation=3, objective="test")
    window.meta_loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in learner.parameters()])


def test_maml_first_and_second_order_meta_gradients_differ() -> None:
    first, second = _maml_meta_grad(True), _maml_meta_grad(False)
    assert torch.isfinite(first).all() and torch.isfinite(second).all()
    assert first.abs().sum() > 0 and second.abs().sum() > 0
    assert not torch.allclose(first, second)


def test_maml_state_starts_at_theta_and_takes_sgd_steps() -> None:
    learner, task = _maml_setup()
    state = learner.init_state(task, torch.Generator())
    assert list(state.params) == list(task.init_params(torch.Generator()))
    assert all(p is learner.init[n.replace(".", "-")] for n, p in state.params.items())
    batch = task.train.full()
    new, loss = learner.step(task, state, batch)
    grads = torch.autograd.grad(task.loss(state.params, batch), list(state.params.values()))
    for (n, p), g in zip(state.params.items(), grads):
        torch.testing.assert_close(new.params[n], p - 0.05 * g)
    assert new.step == 1 and torch.isfinite(loss)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_maml_higher_path_equals_functional_path(first_order: bool, family_name: str) -> None:
    learner, task = _maml_setup(first_order, FAMILIES[family_name]())
    with torch.no_grad():  # distinct per-coordinate learning rates
        for p in learner.log_lr.parameters():
            p.add_(torch.rand(p.shape, generator=torch.Generator().manual_seed(3)) - 0.5)
    results = []
    for adapt in (learner.adapt, learner.adapt_with_higher):
        params = adapt(task, 3)
        learner.zero_grad(set_to_none=True)
        task.loss(params, task.test.full()).backward()
        results.append((params, [p.grad.clone() for p in learner.parameters()]))
    (functional, functional_grads), (via_higher, higher_grads) = results
    assert list(functional) == list(via_higher)
    assert not torch.allclose(functional["0.weight"], learner.init["0-weight"])  # it adapted
    for n in functional:
        torch.testing.assert_close(functional[n], via_higher[n], rtol=1e-5, atol=1e-6)
    # The same meta-gradient, for theta's initialization and its learning rates.
    for a, b in zip(functional_grads, higher_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_maml_fixed_learning_rates_are_buffers() -> None:
    learner = MAMLLearner(SinusoidFamily().model, inner_lr=0.1, learn_lrs=False)
    names = {n for n, _ in learner.named_parameters()}
    assert names and all(n.startswith("init.") for n in names)
    assert all(torch.allclose(lr, torch.tensor(0.1)) for lr in learner.lrs().values())
    assert any(n.startswith("log_lr.") for n in learner.state_dict())


def test_maml_rejects_a_mismatched_task() -> None:
    learner = MAMLLearner(SinusoidFamily().model)
    task = DigitsFewShotFamily(n_way=2).sample(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="parameters"):
        learner.init_state(task, torch.Generator())


def test_a_learned_initialization_refuses_a_model_of_another_size() -> None:
    # The same parameter names, other shapes: it would run with the initialization's sizes.
    five_way = DigitsFewShotFamily(n_way=5).model
    task = DigitsFewShotFamily(n_way=3).sample(torch.Generator().manual_seed(0))
    rule = LSTMRule(hidden_size=8)
    for learner in (MAMLLearner(five_way), OptimizerLearner(rule, init_model=five_way)):
        with pytest.raises(ValueError, match=r"has shape \(3, 64\), the learned initialization"):
            learner.init_state(task, torch.Generator())


def test_learners_refuse_running_statistics_and_keep_a_copy_of_the_encoder() -> None:
    tracked = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))
    for build in (lambda: MAMLLearner(tracked), lambda: RNNLearner(4, 2, encoder=tracked)):
        with pytest.raises(ValueError, match="track_running_stats=False"):
            build()
    encoder = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6, track_running_stats=False)
    )
    before = [p.detach().clone() for p in encoder.parameters()]
    a, b = RNNLearner(4, 2, encoder=encoder, seed=1), RNNLearner(4, 2, encoder=encoder, seed=2)
    assert a.f_dim == 6 and a.encoder is not encoder and a.encoder is not b.encoder
    assert all(torch.equal(p, q) for p, q in zip(before, encoder.parameters()))  # untouched
    assert not torch.equal(a.encoder[0].weight, b.encoder[0].weight)  # each its own seed
    with pytest.raises(ValueError, match="x_dim=4"):
        a.features(torch.randn(3, 5))
    with pytest.raises(ValueError, match="non-empty"):
        a.features(torch.randn(0, 4))


def test_maml_meta_trains_its_learning_rates_with_the_initialization_fixed() -> None:
    family = SinusoidFamily(k_shot=5, n_query=10)
    learner = MAMLLearner(family.model, inner_steps=3, inner_lr=0.05)
    learner.init.requires_grad_(False)  # Meta-SGD's rates alone
    start = {k: v.clone() for k, v in learner.state_dict().items()}
    config = MetaTrainConfig(
        family="sinusoid", horizon=3, truncation=3, objective="test", meta_lr=1e-2,
        meta_batch=2, iterations=2, eval_every=0,
    )  # fmt: skip
    MetaTrainer(config, learner=learner, family=family).train()
    for name, value in learner.state_dict().items():
        assert torch.equal(value, start[name]) == name.startswith("init."), name
    with pytest.raises(ValueError, match="empty batch"):
        task = family.sample(torch.Generator().manual_seed(0))
        x, y = task.train.full()
        learner.step(task, learner.init_state(task, torch.Generator()), (x[:0], y[:0]))


def test_maml_second_order_and_fixed_rates_are_part_of_the_run(tmp_path: Path) -> None:
    family = SinusoidFamily(k_shot=5, n_query=10)
    config = MetaTrainConfig(
        family="sinusoid", horizon=3, truncation=3, objective="test", meta_batch=2,
        iterations=1, eval_every=0, second_order=True,
    )  # fmt: skip
    MetaTrainer(config, learner=MAMLLearner(family.model, inner_steps=3), family=family)
    with pytest.raises(ValueError, match="second_order"):
        first = MAMLLearner(family.model, inner_steps=3, first_order=True)
        MetaTrainer(config, learner=first, family=family)
    with pytest.raises(ValueError, match="inner_steps=5 steps.*horizon=3"):
        MetaTrainer(config, learner=MAMLLearner(family.model), family=family)
    config = MetaTrainConfig.from_dict({**config.to_dict(), "second_order": False})

    def fixed(lr: float) -> MAMLLearner:
        return MAMLLearner(family.model, inner_steps=3, inner_lr=lr, learn_lrs=False)

    MetaTrainer(config, learner=fixed(0.01), family=family, ckpt_dir=tmp_path).train()
    other = MetaTrainer(config, learner=fixed(0.5), family=family, ckpt_dir=tmp_path)
    with pytest.raises(ValueError, match="inner_lr"):  # the checkpoint's rate would replace it
        other.resume()
    # a checkpoint written before its settings recorded inner_lr still resumes
    from learned_opt.checkpoint import atomic_save, safe_load
    from learned_opt.outer import find_checkpoints

    (path,) = find_checkpoints(tmp_path)
    state = safe_load(path)
    del state["learner_settings"]["inner_lr"]
    atomic_save(state, path)
    older = MetaTrainer(config, learner=fixed(0.01), family=family, ckpt_dir=tmp_path)
    assert older.resume() and older.iteration == 1  # (0.01: the default, that of older runs)
    with pytest.raises(ValueError, match="inner_lr"):
        MetaTrainer(config, learner=fixed(0.5), family=family, ckpt_dir=tmp_path).resume()


def test_rnn_learner_is_seeded_and_leaves_the_global_rng_alone() -> None:
    before = torch.random.get_rng_state()
    a, b = RNNLearner(64, 5, seed=1), RNNLearner(64, 5, seed=1)
    gru = RNNLearner(64, 5, cell="gru", seed=1)
    assert torch.equal(before, torch.random.get_rng_state())
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(a.rnn.weight_ih_l0, RNNLearner(64, 5, seed=2).rnn.weight_ih_l0)
    task = DigitsFewShotFamily(n_way=5).sample(torch.Generator().manual_seed(0))
    state, loss = gru.step(task, gru.init_state(task, torch.Generator()), task.train.full())
    assert state.c is None and state.h.shape == (1, 1, 64) and torch.isfinite(loss)
    assert gru.predict(state, task.test.full()[0]).shape == (75, 5)
    with pytest.raises(ValueError, match="cell"):
        RNNLearner(1, 1, cell="rnn")


def test_rnn_learner_depends_on_the_support_set() -> None:
    learner = RNNLearner(1, 1, hidden=16)
    family = SinusoidFamily()
    tasks = [family.sample(torch.Generator().manual_seed(s)) for s in (0, 1)]
    states = [
        learner.step(t, learner.init_state(t, torch.Generator()), t.train.full())[0] for t in tasks
    ]
    x = tasks[0].test.full()[0]
    assert not torch.allclose(learner.predict(states[0], x), learner.predict(states[1], x))
    params = learner.params_of(tasks[0], states[0])
    assert torch.equal(params["h"], states[0].h[0, 0]) and "head.0.weight" in params


def test_meta_training_maml_lowers_the_meta_test_query_loss(tmp_path: Path) -> None:
    family, meta_test = SinusoidFamily(), SinusoidFamily(split="test")
    config = MetaTrainConfig(
        family="sinusoid",
        horizon=5,
        truncation=5,
        objective="test",
        meta_lr=1e-2,
        meta_batch=4,
        iterations=60,
        eval_every=30,
        eval_tasks=16,
        checkpoint_every=30,
    )
    trainer = MetaTrainer(
        config,
        learner=MAMLLearner(family.model),
        family=family,
        eval_family=meta_test,
        ckpt_dir=tmp_path,
    )
    trainer.train()
    before, *_, after = trainer.history["eval_metric"]
    assert trainer.history["eval_iteration"] == [0, 30, 60]
    assert after < 0.7 * before  # query MSE after 5 adaptation steps, on meta-test tasks
    assert trainer.best_metric == min(trainer.history["eval_metric"])
    assert trainer.adam_baseline is None  # the Adam baseline is for update rules only
    # Checkpoints of non-rule learners hold the learner and restore it.
    resumed = MetaTrainer(
        config,
        learner=MAMLLearner(family.model),
        family=family,
        eval_family=meta_test,
        ckpt_dir=tmp_path,
    )
    with warnings.catch_warnings():  # the same held-out tasks: the best metric stands
        warnings.simplefilter("error")
        assert resumed.resume() and resumed.iteration == 60
    assert resumed.best_metric == trainer.best_metric
    for p, q in zip(trainer.learner.parameters(), resumed.learner.parameters()):
        assert torch.equal(p, q)


def test_meta_trainer_evaluates_the_recurrent_learner() -> None:
    family = DigitsFewShotFamily(n_way=3, k_shot=2, n_query=4)
    config = MetaTrainConfig(
        family="digits-fewshot",
        horizon=1,
        truncation=1,
        objective="test",
        iterations=2,
        eval_every=1,
        eval_tasks=2,
    )
    trainer = MetaTrainer(
        config,
        learner=RNNLearner(64, 3, hidden=16, head_hidden=16),
        family=family,
        eval_family=DigitsFewShotFamily(n_way=3, k_shot=2, n_query=4, split="test"),
    )
    trainer.train()
    assert trainer.history["eval_iteration"] == [0, 1, 2]
    metric, curve = trainer.evaluate()
    assert metric == trainer.history["eval_metric"][-1] and curve.shape == (1,)


def test_optimizer_learner_with_learned_init_starts_at_theta() -> None:
    family = FAMILIES["digits"]()
    learner = _lstm_opt_init(family)
    assert learner.init is not None
    task = family.sample(torch.Generator().manual_seed(0))
    # Two generators, one start: the initialization is theta, not a random draw.
    a = learner.init_state(task, torch.Generator().manual_seed(1))
    b = learner.init_state(task, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a.params, b.params)
    expected = torch.cat([p.reshape(-1) for p in learner.init.values_by_name().values()])
    torch.testing.assert_close(a.params, expected)
    assert learner.init.names == [n for n, _ in family.model.named_parameters()]
    # The meta-gradient reaches both the rule and the initialization.
    window = list(
        unroll(learner, task, torch.Generator(), horizon=3, truncation=3, objective="test")
    )[-1]
    window.meta_loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.init.values())
    assert learner.rule.weight_ih_l0.grad.abs().sum() > 0
    other = SinusoidFamily(k_shot=5).sample(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="expected"):
        learner.init_state(other, torch.Generator())


def test_optimizer_learner_tensor_step_sizes_scale_each_tensor_of_the_update() -> None:
    family = FAMILIES["digits"]()
    task = family.sample(torch.Generator().manual_seed(0))
    plain = _lstm_opt_init(family)
    scaled = _lstm_opt_steps(family)
    scaled.load_state_dict(plain.state_dict(), strict=False)
    assert scaled.log_step_sizes is not None and len(scaled.log_step_sizes) == len(plain.init)
    batch = task.train.full()
    gen = torch.Generator()
    # At log-scale 0 the learner is the plain one.
    a, _ = plain.step(task, plain.init_state(task, gen), batch)
    b, _ = scaled.step(task, scaled.init_state(task, gen), batch)
    torch.testing.assert_close(a.params, b.params)
    # Tensor i's update is exp(s_i) times the plain one, whatever the other tensors' sizes.
    sizes = torch.linspace(-1.0, 1.0, len(plain.init))
    with torch.no_grad():
        scaled.log_step_sizes.copy_(sizes)
    start = plain.init_state(task, gen).params.detach()
    b, _ = scaled.step(task, scaled.init_state(task, gen), batch)
    plain_update = a.spec.unflatten((a.params - start).detach())
    scaled_update = b.spec.unflatten((b.params - start).detach())
    for s, name in zip(sizes, a.spec.names):
        torch.testing.assert_close(scaled_update[name], plain_update[name] * s.exp())
    # The meta-gradient reaches every step size.
    window = list(
        unroll(scaled, task, torch.Generator(), horizon=3, truncation=3, objective="test")
    )[-1]
    window.meta_loss.backward()
    assert (scaled.log_step_sizes.grad.abs() > 0).all()
    # Without a fixed model there is no fixed set of tensors to size.
    with pytest.raises(ValueError, match="init_model"):
        OptimizerLearner(LSTMRule(hidden_size=8), step_sizes="tensor")
    with pytest.raises(ValueError, match="step_sizes"):
        OptimizerLearner(LSTMRule(hidden_size=8), init_model=family.model, step_sizes="layer")


def test_optimizer_learner_coordinate_step_sizes_scale_each_coordinate() -> None:
    family = FAMILIES["digits"]()
    task = family.sample(torch.Generator().manual_seed(0))
    plain = _lstm_opt_init(family)
    scaled = OptimizerLearner(plain.rule, init_model=family.model, step_sizes="coordinate")
    scaled.init.load_state_dict(plain.init.state_dict())
    n = sum(p.numel() for p in plain.init.values())
    assert scaled.log_step_sizes.shape == (n,)
    sizes = torch.randn(n, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        scaled.log_step_sizes.copy_(sizes)
    gen, batch = torch.Generator(), task.train.full()
    start = plain.init_state(task, gen).params.detach()
    a, _ = plain.step(task, plain.init_state(task, gen), batch)
    b, _ = scaled.step(task, scaled.init_state(task, gen), batch)
    torch.testing.assert_close(b.params - start, (a.params - start) * sizes.exp())


def test_rnn_learner_rejects_unknown_options() -> None:
    with pytest.raises(ValueError, match="head"):
        RNNLearner(4, 2, head="attention")
    with pytest.raises(ValueError, match="pairs"):
        RNNLearner(4, 2, pairs="sum")
    with pytest.raises(ValueError, match="init"):
        RNNLearner(4, 2, init="zeros")
    with pytest.raises(ValueError, match="accumulator"):  # the MLP head cannot read the classes
        RNNLearner(4, 2, hidden=8, init="accumulator")
    with pytest.raises(ValueError, match="hidden >= "):  # too few units for 2 x 4 slots
        RNNLearner(4, 2, hidden=7, head="bilinear", pairs="outer", init="accumulator")


def test_rnn_learner_accumulator_init_is_a_prototype_classifier() -> None:
    """With init="accumulator" and no encoder, the untrained learner classifies a query by its
    dot product with each class's (squashed) support sum: support points come back labelled."""
    learner = RNNLearner(4, 3, hidden=12, head="bilinear", pairs="outer", init="accumulator")
    x = torch.tensor([[1.0, 0.2, 0.0, 0.0], [0.0, 1.0, 0.0, 0.1], [0.0, 0.0, 1.0, 1.0]])
    y = torch.tensor([0, 1, 2])
    task = DigitsFewShotFamily(n_way=3).sample(torch.Generator().manual_seed(0))
    state, _ = learner.step(task, learner.init_state(task, torch.Generator()), (x, y))
    logits = learner.predict(state, x)
    assert torch.equal(logits.argmax(1), y)
    # ... and the labels, not the order of the support set, decide
    state2, _ = learner.step(
        task, learner.init_state(task, torch.Generator()), (x[[2, 0, 1]], y[[2, 0, 1]])
    )
    assert torch.equal(learner.predict(state2, x).argmax(1), y)


def test_rnn_outer_pairs_keep_each_class_in_its_own_slots() -> None:
    learner = RNNLearner(3, 2, hidden=4, pairs="outer")
    f = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    y = torch.eye(2)
    seq = learner._pairs(f, y)
    assert seq.shape == (2, 3 + 2 + 6)
    torch.testing.assert_close(seq[0, 5:], torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(seq[1, 5:], torch.tensor([0.0, 0.0, 0.0, 4.0, 5.0, 6.0]))


def test_rnn_learner_distance_head_ignores_a_shared_feature_direction() -> None:
    """Two classes whose features share a direction, the second with the larger norm: a dot
    product with the stored class features calls the first class's own support point the second
    class; the distance head labels both right."""
    task = DigitsFewShotFamily(n_way=2).sample(torch.Generator().manual_seed(0))
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 0.5, 0.0, 0.0]])
    y = torch.tensor([0, 1])
    predictions = {}
    for head in ("bilinear", "distance"):
        learner = RNNLearner(4, 2, hidden=8, head=head, pairs="outer", init="accumulator")
        state, _ = learner.step(task, learner.init_state(task, torch.Generator()), (x, y))
        predictions[head] = learner.predict(state, x).argmax(1)
    assert torch.equal(predictions["distance"], y)
    assert torch.equal(predictions["bilinear"], torch.tensor([1, 1]))


def test_rnn_outer_mean_pairs_store_class_means_whatever_k() -> None:
    """With "outer-mean" pairs and the accumulator start, the stored values of a class are the
    mean of its support features: repeating every support point 10 times changes nothing the
    head reads (with "outer" the sums grow and saturate the cell)."""
    task = DigitsFewShotFamily(n_way=2).sample(torch.Generator().manual_seed(0))
    x = torch.tensor([[0.3, 0.1, 0.0, 0.0], [0.0, 0.2, 0.3, 0.0], [0.1, 0.0, 0.0, 0.3]])
    y = torch.tensor([0, 1, 1])
    learner = RNNLearner(4, 2, hidden=8, head="distance", pairs="outer-mean", init="accumulator")
    seq = learner._pairs(x, learner._targets(y, x))
    torch.testing.assert_close(
        seq[:, 6:],
        torch.tensor(
            [
                [0.3, 0.1, 0, 0, 0, 0, 0, 0],
                [0, 0, 0, 0, 0, 0.1, 0.15, 0],
                [0, 0, 0, 0, 0.05, 0, 0, 0.15],
            ]
        ),
    )

    def stored(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        state, _ = learner.step(task, learner.init_state(task, torch.Generator()), (xs, ys))
        return learner.head(state.h[-1, 0]).view(2, 5)[:, :4]

    once, ten = stored(x, y), stored(x.repeat(10, 1), y.repeat(10))
    means = torch.stack([x[0], x[1:].mean(0)])
    # (the head's other weights start at a tenth of the default scheme: a little noise)
    assert torch.nn.functional.cosine_similarity(once, means, dim=1).min() > 0.9
    torch.testing.assert_close(ten, once, atol=0.06, rtol=0.0)  # forget gate ~0.98 per step
    sums = RNNLearner(4, 2, hidden=8, head="distance", pairs="outer", init="accumulator")
    state, _ = sums.step(
        task, sums.init_state(task, torch.Generator()), (x.repeat(10, 1), y.repeat(10))
    )
    assert (sums.head(state.h[-1, 0]).view(2, 5)[:, :4] - once).abs().max() > 0.3
    with pytest.raises(ValueError, match="class labels"):
        learner.step(task, learner.init_state(task, torch.Generator()), (x, x[:, :2]))


def test_rnn_feature_norm_and_meta_param_groups() -> None:
    encoder = torch.nn.Linear(4, 6)
    learner = RNNLearner(4, 2, hidden=12, encoder=encoder, feature_norm=0.3, rnn_lr_scale=0.1)
    f = learner.features(torch.randn(5, 4) + 10.0)
    torch.testing.assert_close(f.mean(1), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(f.std(1, unbiased=False), torch.full((5,), 0.3), atol=1e-3, rtol=0)
    groups = learner.meta_param_groups()
    assert [g["lr_scale"] for g in groups] == [0.1, 1.0]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in learner.rnn.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(learner.parameters()))
    with pytest.raises(ValueError, match="feature_norm"):
        RNNLearner(4, 2, feature_norm=0.0)
    with pytest.raises(ValueError, match="rnn_lr_scale"):
        RNNLearner(4, 2, rnn_lr_scale=-1.0)
