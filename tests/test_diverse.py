"""The "diverse" meta-training distribution (MNIST and scikit-learn tasks) and one meta-training
iteration of the general rule on it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from learned_opt import MetaTrainConfig, MetaTrainer
from learned_opt.tasks import FAMILIES, DiverseFamily, make_family


def _assert_finite_loss_and_gradients(task) -> None:
    params = {
        k: v.requires_grad_(True)
        for k, v in task.init_params(torch.Generator().manual_seed(0)).items()
    }
    loss = task.loss(params, task.train.sample())
    grads = torch.autograd.grad(loss, list(params.values()))
    assert math.isfinite(float(loss.detach())) and all(torch.isfinite(g).all() for g in grads)


@pytest.fixture(scope="module")
def diverse() -> DiverseFamily:
    return make_family("diverse")


def test_diverse_covers_every_member_and_follows_the_task_contract(diverse) -> None:
    assert isinstance(diverse, DiverseFamily) and "diverse" in FAMILIES
    counts = [0] * len(diverse.members)
    for seed in range(60):
        counts[diverse.sample_member(torch.Generator().manual_seed(seed))] += 1
    assert all(c > 0 for c in counts) and counts[0] == max(counts)  # MNIST MLPs weigh most
    kinds = set()
    for seed in range(40):
        task = diverse.sample(torch.Generator().manual_seed(seed))
        kinds.add(task.name.split("(")[0])
        if len(kinds) > 5:
            break
    assert {"mnist-mlp", "digits-mlp", "mnist-conv", "mnist-rnn", "diabetes-mlp"} <= kinds
    for seed in range(5):
        task = diverse.sample(torch.Generator().manual_seed(seed))
        _assert_finite_loss_and_gradients(task)
    config = diverse.config()
    assert config["name"] == "diverse" and len(config["members"]) == 5
    json.dumps(config)


def test_diverse_rescaled_wraps_every_member(diverse) -> None:
    family = make_family("diverse-rescaled")
    task = family.sample(torch.Generator().manual_seed(0))
    assert 0.2 <= task.param_scale <= 5.0 and 1e-2 <= task.loss_scale <= 1e2
    assert all(m["name"] == "rescaled" for m in family.config()["members"])
    assert task.name.startswith(diverse.sample(torch.Generator().manual_seed(0)).name)


def test_one_meta_training_iteration_of_the_general_rule_on_diverse(diverse) -> None:
    config = MetaTrainConfig(
        family="diverse",
        rule="general-lstm",
        rule_kwargs={"hidden_size": 8},
        horizon=4,
        truncation=2,
        meta_batch=2,
        iterations=1,
        eval_every=0,
    )
    trainer = MetaTrainer(config, family=diverse)
    before = {k: v.clone() for k, v in trainer.learner.state_dict().items()}
    stats = trainer.train_iteration()
    assert math.isfinite(stats["meta_loss"]) and math.isfinite(stats["grad_norm"])
    after = trainer.learner.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_val_ood_is_outside_diverse_and_the_ood_benchmark(diverse) -> None:
    from learned_opt.ood import OOD_TASKS

    val = make_family("val-ood")
    assert val.holdout == "val" and val.config()["name"] == "val-ood"
    others = [m.config() for m in diverse.members]
    others += [factory("test").config() for factory in OOD_TASKS.values()]
    arch_keys = ("widths", "channels", "hidden")
    for member in val.members:
        mine = member.config()
        for other in others:
            if (other["name"], other["dataset"]) != (mine["name"], mine["dataset"]):
                continue  # another kind of model or another dataset
            key = next(k for k in arch_keys if k in mine)
            assert not set(mine[key]) & set(other[key]), (mine, other)
    seen = set()
    for seed in range(40):
        task = val.sample(torch.Generator().manual_seed(seed))
        kind = task.name.split("(")[0]
        if kind in seen:
            continue
        seen.add(kind)
        _assert_finite_loss_and_gradients(task)
    assert seen == {"iris-mlp", "digits-mlp", "mnist-conv", "mnist-rnn"}
