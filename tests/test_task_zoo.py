"""Task families of the generalization work: the zoo (MLPs of drawn architecture, conv nets, row
RNNs, tabular problems), random rescaling, mixtures and random horizons. MNIST-free (fast);
the MNIST-based "diverse" distribution is tested in test_diverse.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.func import functional_call

from learned_opt.learners import OptimizerLearner
from learned_opt.outer import unroll
from learned_opt.rules import GeneralLSTMRule
from learned_opt.tasks import (
    ConvFamily,
    MixtureFamily,
    QuadraticFamily,
    RandomMLPFamily,
    RescaledFamily,
    RowRNNFamily,
    sample_horizon,
)
from learned_opt.tasks.rescale import ParamScaled, log_uniform, rescale_task
from learned_opt.tasks.zoo import load_dataset, noisy_labels

FAMILIES = {
    "digits-mlp": lambda: RandomMLPFamily("digits", (8, 16), (0, 1, 2), batch_sizes=(16,)),
    "wine-mlp": lambda: RandomMLPFamily("wine", (8,), (1,), ("tanh",), (16,)),
    "breast-cancer-mlp": lambda: RandomMLPFamily("breast_cancer", (8,), (2,), ("relu",), (32,)),
    "diabetes-mlp": lambda: RandomMLPFamily("diabetes", (8,), (1,), ("gelu",), (16,), None),
    "digits-conv": lambda: ConvFamily("digits", (4,), (2,), (16,)),
    "digits-gru": lambda: RowRNNFamily("digits", ("gru",), (8,), (16,)),
    "digits-rnn": lambda: RowRNNFamily("digits", ("rnn",), (8,), (16,)),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_zoo_tasks_follow_the_task_contract(name: str) -> None:
    family = FAMILIES[name]()
    task = family.sample(torch.Generator().manual_seed(0))
    again = family.sample(torch.Generator().manual_seed(0))
    assert task.name == again.name
    params = task.init_params(torch.Generator().manual_seed(1))
    assert [n for n, _ in task.model.named_parameters()] == list(params)
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    batch = task.train.sample()
    loss = task.loss(params, batch)
    grads = torch.autograd.grad(loss, list(params.values()))
    assert math.isfinite(float(loss.detach())) and all(g.abs().sum() > 0 for g in grads)
    torch.testing.assert_close(again.train.sample()[0], batch[0])  # the data stream is seeded
    with torch.no_grad():
        assert math.isfinite(float(task.loss(params, task.test.sample())))
    json.dumps(family.config())
    # Initializations are drawn from the generator, not the module's own values.
    other = task.init_params(torch.Generator().manual_seed(2))
    assert all(not torch.equal(params[k].detach(), other[k]) for k in params)


def test_tabular_datasets_are_standardized_and_split() -> None:
    tables = [("wine", 178, 13), ("breast_cancer", 569, 30), ("iris", 150, 4)]
    tables.append(("diabetes", 442, 10))
    for name, n, d in tables:
        xt, yt, xv, yv = load_dataset(name, "val")
        xt2, yt2, xh, yh = load_dataset(name, "test")
        assert xt.shape[1] == d and len(xt) + len(xv) + len(xh) == n
        assert len(xt2) == len(xt) + len(xv)
        torch.testing.assert_close(xt.mean(0), torch.zeros(d), atol=1e-5, rtol=0)
        assert yt.dtype == (torch.float32 if name == "diabetes" else torch.int64)
    with pytest.raises(ValueError, match="Unknown dataset"):
        load_dataset("linnerud", "val")


def test_row_rnn_architecture_choices() -> None:
    family = RowRNNFamily("digits", ("rnn", "gru"), (4, 8), (16,))
    seen = {family.sample(torch.Generator().manual_seed(s)).name for s in range(20)}
    assert any("gru(" in s for s in seen) and any("rnn(" in s for s in seen)
    with pytest.raises(ValueError, match="image dataset"):
        RowRNNFamily("wine")
    with pytest.raises(ValueError, match="Invalid MLP"):
        RandomMLPFamily("digits", activations=("swish",))


def test_param_scaled_model_keeps_the_names_and_scales_the_parameters() -> None:
    task = FAMILIES["digits-gru"]().sample(torch.Generator().manual_seed(0))
    wrapped = ParamScaled(task.model, 2.5)
    assert [n for n, _ in wrapped.named_parameters()] == [
        n for n, _ in task.model.named_parameters()
    ]
    params = task.init_params(torch.Generator().manual_seed(0))
    x = task.train.sample()[0]
    out = functional_call(wrapped, params, (x,))
    ref = functional_call(task.model, {k: 2.5 * v for k, v in params.items()}, (x,))
    torch.testing.assert_close(out, ref)
    # A model whose parameter sits on the top-level module (no children).
    quad = QuadraticFamily(dim=4).sample(torch.Generator().manual_seed(0))
    theta = quad.init_params(torch.Generator().manual_seed(0))
    w = quad.train.sample()[0]
    torch.testing.assert_close(
        functional_call(ParamScaled(quad.model, 3.0), theta, (w,)), w @ (3.0 * theta["theta"])
    )


@pytest.mark.parametrize("name", ["digits-mlp", "digits-conv", "diabetes-mlp"])
def test_rescaled_losses_and_gradients_transform(name: str) -> None:
    """f'(theta') = s f(c theta'), theta'_0 = theta_0 / c, grad' = s c grad f(c theta')."""
    task = FAMILIES[name]().sample(torch.Generator().manual_seed(3))
    c, s = 4.0, 0.01
    r = rescale_task(task, c, s)
    p0 = task.init_params(torch.Generator().manual_seed(5))
    q0 = r.init_params(torch.Generator().manual_seed(5))
    for k in p0:
        torch.testing.assert_close(q0[k], p0[k] / c)
    batch = task.train.sample()
    q = {k: (v + 0.05 * torch.randn_like(v)).requires_grad_(True) for k, v in q0.items()}
    theta = {k: (c * v.detach()).requires_grad_(True) for k, v in q.items()}
    loss_r, loss = r.loss(q, batch), task.loss(theta, batch)
    torch.testing.assert_close(loss_r, s * loss)
    grads_r = torch.autograd.grad(loss_r, list(q.values()))
    grads = torch.autograd.grad(loss, list(theta.values()))
    for a, b in zip(grads_r, grads):
        torch.testing.assert_close(a, s * c * b, rtol=1e-4, atol=1e-9)
    # the model and loss function alone (how MAML-style learners use a task) agree with loss()
    x, y = batch
    torch.testing.assert_close(r.loss_fn(functional_call(r.model, q, (x,)), y), loss_r)
    # at initialization the function is the original one
    torch.testing.assert_close(r.loss(q0, batch), s * task.loss(p0, batch))


def test_rescaled_family_draws_log_uniform_scales() -> None:
    base = FAMILIES["wine-mlp"]()
    family = RescaledFamily(base, (0.1, 10.0), (1e-2, 1e2))
    cs, ss = [], []
    for seed in range(200):
        task = family.sample(torch.Generator().manual_seed(seed))
        assert task.name.startswith(base.sample(torch.Generator().manual_seed(seed)).name)
        assert 0.1 <= task.param_scale <= 10 and 1e-2 <= task.loss_scale <= 1e2
        cs.append(math.log10(task.param_scale))
        ss.append(math.log10(task.loss_scale))
    assert abs(sum(cs) / len(cs)) < 0.15 and abs(sum(ss) / len(ss)) < 0.3
    assert min(cs) < -0.8 and max(cs) > 0.8  # spread over the decades
    again = family.sample(torch.Generator().manual_seed(7))
    assert again.name == family.sample(torch.Generator().manual_seed(7)).name
    json.dumps(family.config())
    assert RescaledFamily(base, (1, 1), (1, 1)).sample(torch.Generator()).param_scale == 1.0
    with pytest.raises(ValueError):
        RescaledFamily(base, (0.0, 1.0))
    with pytest.raises(ValueError):
        log_uniform(2.0, 1.0, torch.Generator())


def test_scale_invariant_rule_ignores_the_loss_scale_of_a_rescaled_task() -> None:
    """The general rule (scale-invariant inputs, nominal step) trained on s * f follows the same
    trajectory as on f: the loss scale of RescaledFamily cannot hurt it."""
    task = FAMILIES["diabetes-mlp"]().sample(torch.Generator().manual_seed(0))
    rule = GeneralLSTMRule(hidden_size=8, lr=0.01)
    rule.reset_parameters(torch.Generator().manual_seed(0), zero_output=False)
    learner = OptimizerLearner(rule)
    finals = []
    for s in (1.0, 1000.0):
        t = rescale_task(task, 1.0, s)
        t.train.generator.manual_seed(0)
        (w,) = list(unroll(learner, t, torch.Generator().manual_seed(1), horizon=8, truncation=8))
        finals.append(w.state.params.detach())
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-4, atol=1e-5)


def test_label_noise_flips_the_same_training_labels_and_leaves_the_held_out_split() -> None:
    labels = torch.arange(3).repeat(400)
    noisy = noisy_labels(labels, 0.2, 3)
    assert torch.equal(noisy, noisy_labels(labels, 0.2, 3))  # the same flips every time
    assert 0.15 < (noisy != labels).float().mean() < 0.25 and int(noisy.max()) == 2
    assert torch.equal(noisy_labels(labels, 0.0, 3), labels)
    clean = RandomMLPFamily("iris", (4,), (1,), ("tanh",), (8,), None)
    family = RandomMLPFamily("iris", (4,), (1,), ("tanh",), (8,), None, label_noise=0.2)
    a, b = (f.sample(torch.Generator().manual_seed(0)) for f in (clean, family))
    assert "noise=0.2" in b.name and family.config()["label_noise"] == 0.2
    assert "label_noise" not in clean.config()
    assert not torch.equal(a.train.y, b.train.y) and torch.equal(a.test.y, b.test.y)
    with pytest.raises(ValueError, match="classification"):
        RandomMLPFamily("diabetes", label_noise=0.1)
    with pytest.raises(ValueError, match="label noise"):
        RandomMLPFamily("iris", label_noise=1.0)


def test_mixture_family_samples_members_by_weight() -> None:
    a = RandomMLPFamily("wine", (4,), (1,), ("tanh",), (8,))
    b = RandomMLPFamily("diabetes", (4,), (1,), ("relu",), (8,), None)
    mix = MixtureFamily([a, b], [1.0, 3.0], name="test-mix")
    names = [mix.sample(torch.Generator().manual_seed(s)).name for s in range(200)]
    share = sum(n.startswith("diabetes") for n in names) / len(names)
    assert 0.65 < share < 0.85
    assert names[:5] == [mix.sample(torch.Generator().manual_seed(s)).name for s in range(5)]
    config = mix.config()
    assert config["name"] == "test-mix" and len(config["members"]) == 2
    json.dumps(config)
    with pytest.raises(ValueError):
        MixtureFamily([])
    with pytest.raises(ValueError):
        MixtureFamily([a], [1.0, 2.0])


def test_sample_horizon_is_log_uniform_in_range() -> None:
    gen = torch.Generator().manual_seed(0)
    hs = [sample_horizon(gen, 50, 1000) for _ in range(2000)]
    assert min(hs) >= 50 and max(hs) <= 1000 and max(hs) > 900 and min(hs) < 55
    hs.sort()
    median = hs[len(hs) // 2]
    assert 180 < median < 280  # sqrt(50 * 1000) = 224
    short = sum(h < 100 for h in hs) / len(hs)  # one octave of 4.3: ~23%
    assert 0.18 < short < 0.28
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert sample_horizon(g1) == sample_horizon(g2)
    assert sample_horizon(gen, 7, 7) == 7
    with pytest.raises(ValueError):
        sample_horizon(gen, 10, 5)
