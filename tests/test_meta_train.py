from __future__ import annotations

import dataclasses
import math
import os
import warnings
from pathlib import Path

import pytest
import torch

from learned_opt import LSTMOptimizer
from learned_opt.checkpoint import CheckpointError
from learned_opt.outer import MetaTrainConfig, MetaTrainer, find_checkpoints

SMALL = dict(
    family="quadratic",
    horizon=12,
    truncation=4,
    eval_tasks=3,
    eval_every=2,
    checkpoint_every=1,
    meta_lr=3e-3,
    seed=3,
)


def _weights(trainer: MetaTrainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.learner.parameters()]


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path: Path) -> None:
    full = MetaTrainer(MetaTrainConfig(iterations=6, **SMALL), ckpt_dir=tmp_path / "full")
    full.train()

    first = MetaTrainer(MetaTrainConfig(iterations=3, **SMALL), ckpt_dir=tmp_path / "split")
    first.train()
    second = MetaTrainer(MetaTrainConfig(iterations=6, **SMALL), ckpt_dir=tmp_path / "split")
    assert second.resume()
    assert second.iteration == 3
    second.train()

    for a, b in zip(_weights(full), _weights(second)):
        assert torch.equal(a, b)
    assert full.history == second.history
    assert full.best_metric == second.best_metric


def test_tensorboard_logs_checkpoints_and_best_weights(tmp_path: Path) -> None:
    trainer = MetaTrainer(
        MetaTrainConfig(iterations=4, keep_checkpoints=2, **SMALL),
        log_dir=tmp_path / "tb",
        ckpt_dir=tmp_path / "ckpt",
    )
    trainer.train()
    trainer.close()
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "meta/loss",
        "meta/grad_norm",
        "eval/metric",
        "eval/adam_tuned_metric",
        "eval/ratio_vs_adam",
        "eval/best_metric",
    ):
        assert tag in tags, tag
    assert not {"eval/metric_told", "eval/metric_untold"} & tags  # each task ran once
    assert len(acc.Scalars("meta/loss")) == 4
    assert [p.name for p in find_checkpoints(tmp_path / "ckpt")] == [
        "ckpt_00000004.pt",
        "ckpt_00000003.pt",
    ]
    # The best rule is selected by held-out evaluation and loads into the drop-in optimizer.
    opt = LSTMOptimizer([torch.nn.Parameter(torch.ones(2))], weights=tmp_path / "ckpt" / "best.pt")
    assert opt.metadata["eval_metric"] == pytest.approx(trainer.best_metric)
    assert trainer.best_metric == min(trainer.history["eval_metric"])


def test_tensorboard_logs_the_held_out_metric_told_and_untold(tmp_path: Path) -> None:
    """With ``eval_untold`` a rule that reads the run's length is scored told and untold: both
    halves are logged beside the metric that aggregates them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = MetaTrainConfig(
        iterations=1, eval_untold=True, log_meta_loss=True, rule="scheduled",
        rule_kwargs={"base": "adam", "basis": True}, **SMALL,
    )  # fmt: skip
    trainer = MetaTrainer(config, log_dir=tmp_path / "tb")
    trainer.train()
    trainer.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    told, untold, both = (
        acc.Scalars(f"eval/{tag}")[-1].value for tag in ("metric_told", "metric_untold", "metric")
    )
    assert both == pytest.approx(math.sqrt(told * untold), rel=1e-5)


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path: Path) -> None:
    trainer = MetaTrainer(MetaTrainConfig(iterations=3, **SMALL), ckpt_dir=tmp_path)
    trainer.train()
    newest = find_checkpoints(tmp_path)[0]
    newest.write_bytes(newest.read_bytes()[:100])
    again = MetaTrainer(MetaTrainConfig(iterations=3, **SMALL), ckpt_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="unreadable checkpoint"):
        assert again.resume()
    assert again.iteration == 2
    # kept aside, its bytes as they were, and out of the kept checkpoints' count
    assert (tmp_path / (newest.name + ".unreadable")).stat().st_size == 100
    assert newest not in find_checkpoints(tmp_path)


@pytest.mark.parametrize(
    "damage",
    ["nan-weights", "no-learner", "wrong-shape", "not-a-dict", "no-meta-groups", "history",
     "iteration"],
)  # fmt: skip
def test_a_malformed_newest_checkpoint_falls_back_to_previous(tmp_path: Path, damage: str) -> None:
    """A checkpoint that reads but does not hold a trainer's whole, finite state (non-finite
    weights, a missing entry, a tensor of another shape) is set aside like a corrupt one; a
    checkpoint of another configuration is not (that is refused: the next test)."""
    from learned_opt.checkpoint import atomic_save, safe_load

    trainer = MetaTrainer(MetaTrainConfig(iterations=3, **SMALL), ckpt_dir=tmp_path)
    trainer.train()
    newest = find_checkpoints(tmp_path)[0]
    state = safe_load(newest)
    name = next(iter(state["learner"]))
    if damage == "nan-weights":
        state["learner"][name] = torch.full_like(state["learner"][name], float("nan"))
    elif damage == "no-learner":
        del state["learner"]
    elif damage == "wrong-shape":
        state["learner"][name] = torch.zeros(3)
    elif damage == "no-meta-groups":  # (it failed after the learner had been loaded)
        state["meta_optimizer"]["param_groups"] = []
    elif damage == "history":
        state["history"] = [1, 2]
    elif damage == "iteration":
        state["iteration"] = "2"
    else:
        state = {"format": state["format"], "x": 1}
    atomic_save(state, newest)
    again = MetaTrainer(MetaTrainConfig(iterations=3, **SMALL), ckpt_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="unreadable checkpoint"):
        assert again.resume()
    assert again.iteration == 2
    assert all(bool(torch.isfinite(w).all()) for w in _weights(again))
    assert (tmp_path / (newest.name + ".unreadable")).is_file()


def _interrupted_and_resumed(tmp_path: Path, checkpoint_every: int, iterations: int) -> int:
    """A 5-iteration run (logging to ``tmp_path/tb``, evaluating every 2) killed after its
    last checkpoint (that checkpoint deleted), then resumed to ``iterations``; returns the
    iteration it resumed at."""
    config = {**SMALL, "eval_every": 2, "checkpoint_every": checkpoint_every}
    dirs = {"log_dir": tmp_path / "tb", "ckpt_dir": tmp_path / "ckpt"}
    first = MetaTrainer(MetaTrainConfig(**{**config, "iterations": 5}), **dirs)
    first.train()
    first.close()
    find_checkpoints(tmp_path / "ckpt")[0].unlink()
    again = MetaTrainer(MetaTrainConfig(**{**config, "iterations": iterations}), **dirs)
    assert again.resume()
    resumed_at = again.iteration
    again.train()
    again.close()
    return resumed_at


def test_a_resumed_runs_tensorboard_log_shows_each_step_once(tmp_path: Path) -> None:
    """Steps the interrupted run logged after its last checkpoint are purged from the log
    when the resumed run logs them again."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.plugin_event_accumulator import (
        EventAccumulator as PluginEventAccumulator,  # what TensorBoard's dashboards read
    )

    # killed after logging step 5, unsaved; resumed at 4
    assert _interrupted_and_resumed(tmp_path, checkpoint_every=2, iterations=6) == 4
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("meta/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in acc.Scalars("eval/metric")] == [0, 2, 4, 6]
    plugin = PluginEventAccumulator(str(tmp_path / "tb"))
    plugin.Reload()
    assert [e.step for e in plugin.Tensors("meta/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in plugin.Tensors("config/text_summary")] == [0, 5]  # each session's


def test_a_resumed_run_logs_each_held_out_curve_once(tmp_path: Path) -> None:
    """The per-evaluation curves (``add_scalars``' event files of their own, which TensorBoard's
    purge does not reach) of an evaluation the interrupted run made after its last checkpoint
    are replaced, not doubled, when the resumed run evaluates again."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # killed after evaluating at 4, unsaved; resumed at 3
    assert _interrupted_and_resumed(tmp_path, checkpoint_every=3, iterations=5) == 3
    curve = tmp_path / "tb" / "eval_curves_iter_0000004_learned"
    acc = EventAccumulator(str(curve))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("eval_curves/iter_0000004")]
    assert steps == list(range(len(steps))) and steps


def test_a_fresh_run_in_a_used_log_directory_logs_each_held_out_curve_once(
    tmp_path: Path,
) -> None:
    """A new run (another checkpoint directory) logging where an earlier one did: its writer
    hides the earlier run's scalars, and its held-out curves replace the earlier ones (they
    held both runs' points at each step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run, meta_lr in (("first", 1e-2), ("second", 3e-2)):
        config = MetaTrainConfig(**dict(SMALL, iterations=2, meta_lr=meta_lr))
        trainer = MetaTrainer(config, log_dir=tmp_path / "tb", ckpt_dir=tmp_path / run)
        trainer.train()
        trainer.close()
    acc = EventAccumulator(str(tmp_path / "tb" / "eval_curves_iter_0000002_learned"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("eval_curves/iter_0000002")]
    assert steps == list(range(len(steps))) and steps


def test_a_time_budget_counts_the_first_evaluation(tmp_path: Path) -> None:
    """The held-out evaluation before the first iteration (which tunes Adam's baseline) is
    part of what the run costs: a budget it exceeds runs no iteration."""
    trainer = MetaTrainer(MetaTrainConfig(iterations=3, time_budget=1e-6, **SMALL))
    trainer.train()
    assert trainer.iteration == 0 and trainer.elapsed > 1e-6


@pytest.mark.parametrize(
    "bad",
    [
        {"meta_lr": float("nan")},
        {"clip_grad": -1.0},
        {"time_budget": -5.0},
        {"time_budget": 0.0},
        {"eval_horizon": 0},
        {"eval_horizon": -4},
    ],
)
def test_settings_that_cannot_run_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match="Invalid"):
        MetaTrainConfig(**{**SMALL, **bad})


def test_init_weights_refuse_rule_kwargs_that_describe_another_rule() -> None:
    """The rule comes from the file: options that say otherwise are an error, not ignored
    (and recorded as if they had been used); options that describe it are fine."""
    config = {**SMALL, "family": "quadratic", "rule": "lstm", "init_weights": "quadratic"}
    with pytest.raises(ValueError, match="hidden_size"):
        MetaTrainer(MetaTrainConfig(**config, rule_kwargs={"hidden_size": 5}))
    MetaTrainer(MetaTrainConfig(**config, rule_kwargs={"hidden_size": 20}))


def test_resume_refuses_a_different_configuration(tmp_path: Path) -> None:
    MetaTrainer(MetaTrainConfig(iterations=1, **SMALL), ckpt_dir=tmp_path).train()
    other = MetaTrainer(
        MetaTrainConfig(iterations=1, **{**SMALL, "truncation": 6}), ckpt_dir=tmp_path
    )
    with pytest.raises(ValueError, match="truncation"):
        other.resume()


def test_resume_on_other_held_out_tasks_evaluates_the_best_weights_again(tmp_path: Path) -> None:
    """A checkpoint's best metric was measured on its held-out tasks; resumed where those are
    others (a task group redefined, or a checkpoint that did not record them), the best weights
    are evaluated again on the current ones, with a warning, and the tuned-Adam baseline is
    recomputed; on the same tasks nothing changes."""
    from learned_opt.outer import checkpoints

    first = MetaTrainer(MetaTrainConfig(iterations=3, **SMALL), ckpt_dir=tmp_path)
    first.train()
    state = first.state_dict()
    assert state["eval_family"] == first.eval_family.config()
    same = MetaTrainer(MetaTrainConfig(iterations=4, **SMALL), ckpt_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert same.resume()
    assert same.best_metric == first.best_metric and same.adam_baseline is not None

    for saved in ({**state["eval_family"], "seed": -1}, None):
        changed = {**state, "best_metric": first.best_metric / 2}  # as if on other tasks
        if saved is None:
            del changed["eval_family"]
        else:
            changed["eval_family"] = saved
        torch.save(changed, checkpoints.find_checkpoints(tmp_path)[0])  # the one resumed
        resumed = MetaTrainer(MetaTrainConfig(iterations=4, **SMALL), ckpt_dir=tmp_path)
        with pytest.warns(RuntimeWarning, match="held-out tasks"):
            assert resumed.resume()
        best = MetaTrainer(MetaTrainConfig(iterations=4, **SMALL))
        best.learner.load_state_dict(first.best_state)
        assert resumed.best_metric == best.evaluate()[0] == first.best_metric
        assert resumed.adam_baseline is None and resumed.iteration == 3
        for a, b in zip(_weights(first), _weights(resumed)):  # the latest weights kept
            assert torch.equal(a, b)
        change = resumed.notes["held_out_changes"][-1]
        assert change["saved_best_metric"] == first.best_metric / 2
        assert ("seed: -1 then, None now" if saved else "not recorded") in str(change)
        resumed.train()  # goes on, its baseline recomputed
        assert resumed.iteration == 4 and resumed.adam_baseline is not None


def test_non_finite_meta_gradient_skips_the_step(tmp_path: Path) -> None:
    trainer = MetaTrainer(
        MetaTrainConfig(
            iterations=1, eval_every=0, **{k: v for k, v in SMALL.items() if k != "eval_every"}
        )
    )
    before = _weights(trainer)
    grads = [torch.full_like(p, float("nan")) for p in trainer.learner.parameters()]
    _, stepped = trainer._meta_step(grads, float("nan"), 1)
    assert not stepped and trainer.skipped_steps == 1
    for a, b in zip(before, _weights(trainer)):
        assert torch.equal(a, b)


def test_meta_training_beats_its_initialization() -> None:
    trainer = MetaTrainer(
        MetaTrainConfig(
            **{
                **SMALL,
                "horizon": 30,
                "truncation": 10,
                "iterations": 30,
                "eval_every": 30,
                "eval_tasks": 4,
            }
        )
    )
    trainer.train()
    first, last = trainer.history["eval_metric"][0], trainer.history["eval_metric"][-1]
    assert last < 0.5 * first


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="objective"):
        MetaTrainConfig(objective="sum")
    with pytest.raises(ValueError, match="truncation"):
        MetaTrainConfig(truncation=0)
    with pytest.raises(ValueError, match="estimator"):
        MetaTrainConfig(estimator="reinforce")
    with pytest.raises(ValueError, match="backpropagation only"):
        MetaTrainConfig(estimator="pes", grad_checkpoint=True)
    with pytest.raises(ValueError, match="min_horizon"):
        MetaTrainConfig(horizon=10, min_horizon=11)
    with pytest.raises(ValueError, match="checkpoint_every"):
        MetaTrainConfig(checkpoint_every=0)
    with pytest.raises(ValueError, match="without eval_family"):
        MetaTrainConfig(eval_family_kwargs={"dim": 50})


def test_pes_estimator_meta_trains_and_resumes_exactly(tmp_path: Path) -> None:
    cfg = dict(SMALL, estimator="pes", estimator_kwargs={"sigma": 0.01, "pairs": 4})
    full = MetaTrainer(MetaTrainConfig(iterations=4, **cfg), ckpt_dir=tmp_path / "full")
    before = _weights(full)
    full.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, _weights(full)))
    first = MetaTrainer(MetaTrainConfig(iterations=2, **cfg), ckpt_dir=tmp_path / "split")
    first.train()
    second = MetaTrainer(MetaTrainConfig(iterations=4, **cfg), ckpt_dir=tmp_path / "split")
    assert second.resume()
    second.train()
    for a, b in zip(_weights(full), _weights(second)):
        assert torch.equal(a, b)
    # The estimator is part of the run's definition: TBPTT may not resume a PES run.
    with pytest.raises(ValueError, match="estimator"):
        MetaTrainer(MetaTrainConfig(iterations=4, **SMALL), ckpt_dir=tmp_path / "split").resume()


def test_pes_meta_training_beats_its_initialization() -> None:
    cfg = {**SMALL, "horizon": 20, "truncation": 10, "iterations": 20, "eval_every": 20}
    trainer = MetaTrainer(
        MetaTrainConfig(
            **{**cfg, "eval_tasks": 4, "meta_lr": 1e-2},
            estimator="pes",
            estimator_kwargs={"sigma": 0.02, "pairs": 8},
        )
    )
    trainer.train()
    first, last = trainer.history["eval_metric"][0], trainer.history["eval_metric"][-1]
    assert last < 0.8 * first


def test_random_horizons_are_heavy_tailed_deterministic_and_unrolled() -> None:
    cfg = MetaTrainConfig(**{**SMALL, "horizon": 200, "meta_batch": 4}, min_horizon=10)
    drawn = [cfg.task_horizon(i, j) for i in range(50) for j in range(4)]
    assert drawn == [cfg.task_horizon(i, j) for i in range(50) for j in range(4)]
    assert min(drawn) >= 10 and max(drawn) <= 200 and len(set(drawn)) > 50
    # Log-uniform: about as many tasks in [10, 45) as in [45, 200].
    short = sum(t < 45 for t in drawn) / len(drawn)
    assert 0.35 < short < 0.65
    assert MetaTrainConfig(**SMALL).task_horizon(3, 1) == SMALL["horizon"]

    trainer = MetaTrainer(cfg)
    stats = trainer.train_iteration()
    horizons = [cfg.task_horizon(0, j) for j in range(4)]
    assert stats["inner_steps"] == sum(horizons) and len(set(horizons)) > 1
    assert stats["meta_loss"] == stats["meta_loss"]
    # One meta-step per round of windows, until the longest task ends.
    p = next(trainer.learner.parameters())
    rounds = -(-max(horizons) // cfg.truncation)
    assert int(trainer.meta_opt.state[p]["step"]) == rounds


def test_repeated_non_finite_meta_gradients_roll_back_with_lower_lr() -> None:
    cfg = MetaTrainConfig(
        iterations=2,
        eval_every=0,
        rollback_after=3,
        rollback_lr_factor=0.5,
        **{k: v for k, v in SMALL.items() if k != "eval_every"},
    )
    trainer = MetaTrainer(cfg)
    trainer.train_iteration()  # some good steps
    trainer.iteration += 1
    trainer.save_checkpoint()  # the last good state (kept in memory without a ckpt_dir)
    good = _weights(trainer)
    trainer.train_iteration()  # moves away from it
    hooks = [p.register_hook(lambda g: g * float("nan")) for p in trainer.learner.parameters()]
    with pytest.warns(RuntimeWarning, match="in a row at iteration 2: rolled back"):
        trainer.train_iteration()  # 3 windows, all non-finite (of iteration 2, under way)
    for h in hooks:
        h.remove()
    assert trainer.rollbacks == 1 and trainer.skipped_steps == 3
    assert trainer.meta_opt.param_groups[0]["lr"] == pytest.approx(cfg.meta_lr * 0.5)
    for a, b in zip(good, _weights(trainer)):
        assert torch.equal(a, b)
    stats = trainer.train_iteration()  # and training goes on, finite
    assert all(torch.isfinite(p).all() for p in trainer.learner.parameters())
    assert stats["meta_loss"] == stats["meta_loss"]


def test_log_meta_loss_trains_and_evaluates_with_geometric_means() -> None:
    cfg = MetaTrainConfig(**{**SMALL, "iterations": 2, "eval_every": 2}, log_meta_loss=True)
    trainer = MetaTrainer(cfg)
    trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.learner.parameters())
    metric, _ = trainer.evaluate()
    assert metric == trainer.history["eval_metric"][-1]
    finals = []
    from learned_opt.evaluate import run_optimizer
    from learned_opt.optim import LearnedOptimizer

    for s in trainer.held_out.seeds:
        run = run_optimizer(
            trainer.eval_family,
            s,
            lambda p, lr: LearnedOptimizer(p, trainer.learner.rule, lr=lr),
            1.0,
            cfg.horizon,
            name="learned",
        )
        finals.append(run.final_train_loss)
    geo = float(torch.tensor(finals, dtype=torch.float64).log().mean().exp())
    assert metric == pytest.approx(geo, rel=1e-6)
    assert trainer.held_out.aggregate([1.0, float("nan")]) == float("inf")
    with torch.no_grad():  # weights a diverged meta-step would leave: an infinite metric
        next(trainer.learner.parameters())[0] = float("nan")
    assert trainer.evaluate()[0] == float("inf")


def test_eval_family_selects_on_other_tasks_without_changing_training(tmp_path: Path) -> None:
    plain = MetaTrainer(MetaTrainConfig(iterations=4, **SMALL), ckpt_dir=tmp_path / "plain")
    plain.train()
    cfg = MetaTrainConfig(
        iterations=4, eval_family="quadratic", eval_family_kwargs={"dim": 3}, **SMALL
    )
    other = MetaTrainer(cfg, ckpt_dir=tmp_path / "other")
    assert other.eval_family.config() != other.family.config()
    other.train()
    for p, q in zip(_weights(plain), _weights(other), strict=True):
        assert torch.equal(p, q)  # evaluation draws from its own stream: training is the same
    assert plain.best_metric != other.best_metric  # scored on other tasks
    # the setting is part of the run: kept in checkpoints, and a resume must match it
    again = MetaTrainer(
        MetaTrainConfig(**{**cfg.to_dict(), "iterations": 5}), ckpt_dir=tmp_path / "other"
    )
    assert again.resume() and again.eval_family.config() == other.eval_family.config()
    mismatched = MetaTrainer(MetaTrainConfig(iterations=5, **SMALL), ckpt_dir=tmp_path / "other")
    with pytest.raises(ValueError, match="eval_family"):
        mismatched.resume()


def test_learner_param_groups_scale_the_meta_learning_rate() -> None:
    from learned_opt import RNNLearner
    from learned_opt.tasks.fewshot import DigitsFewShotFamily

    family = DigitsFewShotFamily(n_way=2, k_shot=1)
    learner = RNNLearner(64, 2, hidden=16, rnn_lr_scale=0.01)
    cfg = MetaTrainConfig(family=family.name, horizon=1, truncation=1, objective="test",
                          meta_lr=1e-2, iterations=1, eval_every=0)  # fmt: skip
    trainer = MetaTrainer(cfg, learner=learner, family=family)
    assert [g["lr"] for g in trainer.meta_opt.param_groups] == pytest.approx([1e-4, 1e-2])
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    trainer.train()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in learner.named_parameters()}
    # Adam's first step moves each entry by about its group's learning rate
    assert 0 < moved["rnn.weight_hh_l0"] <= 1.01e-4
    assert moved["head.0.weight"] > 5e-3

    class Broken(RNNLearner):
        def meta_param_groups(self) -> list[dict]:
            return [{"params": list(self.rnn.parameters())}]  # misses the head

    with pytest.raises(ValueError, match="each of the learner's parameters once"):
        MetaTrainer(cfg, learner=Broken(64, 2, hidden=16), family=family)


def test_cosine_meta_lr_schedule_decays_and_resumes(tmp_path: Path) -> None:
    small = {k: v for k, v in SMALL.items() if k != "eval_every"}
    cfg = MetaTrainConfig(iterations=4, eval_every=0, meta_lr_schedule="cosine", **small)
    full = MetaTrainer(cfg, ckpt_dir=tmp_path / "full")
    lrs = []
    full.train(on_iteration=lambda t, _: lrs.append(t.meta_opt.param_groups[0]["lr"]))
    # set before each meta-step from the iteration it belongs to: 0, 1, 2, 3 of 4
    expected = [cfg.meta_lr * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    assert lrs == pytest.approx(expected)
    first = MetaTrainer(cfg, ckpt_dir=tmp_path / "split")  # the same run, stopped half-way
    for _ in range(2):
        first.train_iteration()
        first.iteration += 1
    first.save_checkpoint()
    second = MetaTrainer(cfg, ckpt_dir=tmp_path / "split")
    assert second.resume() and second.iteration == 2
    second.train()
    for a, b in zip(_weights(full), _weights(second)):
        assert torch.equal(a, b)
    constant = MetaTrainer(MetaTrainConfig(iterations=4, eval_every=0, **small),
                           ckpt_dir=tmp_path / "split")  # fmt: skip
    with pytest.raises(ValueError, match="meta_lr_schedule"):
        constant.resume()
    with pytest.raises(ValueError, match="meta_lr_schedule"):
        MetaTrainConfig(meta_lr_schedule="linear")


def test_loss_averse_meta_training_starts_at_zero_and_resumes_exactly(tmp_path: Path) -> None:
    """With ``loss_aversion`` the reference is the rule the run starts from: at a zero read-out
    (the nominal rule) the first meta-loss is exactly 0; the reference stays frozen while the
    rule moves, travels in checkpoints, and a resumed run ends like an uninterrupted one."""
    cfg = dict(
        SMALL,
        rule="general-lstm",
        rule_kwargs={"hidden_size": 4, "num_layers": 1},
        horizon=8,
        truncation=8,
        log_meta_loss=True,
        loss_aversion=2.0,
        eval_every=0,
    )
    full = MetaTrainer(MetaTrainConfig(iterations=4, **cfg), ckpt_dir=tmp_path / "full")
    start = [p.detach().clone() for p in full.reference.parameters()]
    assert full.train_iteration()["meta_loss"] == 0.0
    full.iteration += 1
    full.train()
    assert any(not torch.equal(a, b) for a, b in zip(start, _weights(full)))
    assert all(torch.equal(a, b) for a, b in zip(start, full.reference.parameters()))
    assert not any(p.requires_grad for p in full.reference.parameters())

    first = MetaTrainer(MetaTrainConfig(iterations=2, **cfg), ckpt_dir=tmp_path / "split")
    first.train()
    second = MetaTrainer(MetaTrainConfig(iterations=4, **cfg), ckpt_dir=tmp_path / "split")
    with torch.no_grad():  # the checkpoint's reference is the one used, not the constructor's
        for p in second.reference.parameters():
            p.add_(1.0)
    assert second.resume()
    second.train()
    for a, b in zip(_weights(full), _weights(second)):
        assert torch.equal(a, b)
    for a, b in zip(start, second.reference.parameters()):
        assert torch.equal(a, b)

    with pytest.raises(ValueError, match="log_meta_loss"):
        MetaTrainConfig(**{**cfg, "log_meta_loss": False})
    with pytest.raises(ValueError, match="tbptt"):
        MetaTrainConfig(**cfg, estimator="pes")
    with pytest.raises(ValueError, match="loss_aversion"):
        MetaTrainConfig(**{**cfg, "loss_aversion": -0.5})


def test_without_evaluations_the_exported_weights_are_the_latest(tmp_path: Path) -> None:
    """``eval_every=0``: nothing selects, so ``--export`` and ``best.pt`` hold the trained
    weights (not the untrained ones the run started from), marked as the latest."""
    from learned_opt import load_rule

    small = {k: v for k, v in SMALL.items() if k != "eval_every"}
    trainer = MetaTrainer(MetaTrainConfig(iterations=2, eval_every=0, **small), ckpt_dir=tmp_path)
    start = _weights(trainer)
    trainer.train()
    trainer.export_best(tmp_path / "w.pt")
    for path in (tmp_path / "w.pt", tmp_path / "best.pt"):
        rule, meta = load_rule(path)
        assert meta["selected"].startswith("latest") and meta["best_iteration"] == 2
        for a, b, c in zip(rule.parameters(), trainer.learner.rule.parameters(), start):
            assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_run_of_skipped_steps_across_a_checkpoint_rolls_back_after_resume(tmp_path) -> None:
    """The count of non-finite meta-steps in a row is part of the checkpoint: a resumed run
    rolls back where the uninterrupted one does."""
    small = {k: v for k, v in SMALL.items() if k not in ("eval_every", "checkpoint_every")}
    cfg = MetaTrainConfig(iterations=2, eval_every=0, checkpoint_every=1, **small)
    trainer = MetaTrainer(cfg, ckpt_dir=tmp_path)
    trainer.train()
    trainer.consecutive_skips = 2  # two skipped steps just before the checkpoint
    trainer.save_checkpoint()
    resumed = MetaTrainer(cfg, ckpt_dir=tmp_path)
    assert resumed.resume() and resumed.consecutive_skips == 2


def test_horizon_aware_rules_are_told_the_horizon_by_pes_and_by_the_evaluation() -> None:
    """A rule that reads the run's length sees it in PES's particles (as in backpropagated
    unrolls) and in the held-out evaluation that selects it."""
    from learned_opt.outer import factory
    from learned_opt.outer.held_out import HeldOut

    cfg = MetaTrainConfig(
        family="quadratic", rule="scheduled", rule_kwargs={"base": "lstm"}, horizon=10,
        truncation=5, estimator="pes", estimator_kwargs={"pairs": 1}, eval_tasks=1,
    )  # fmt: skip
    learner, family = factory.build_learner(cfg), factory.build_family(cfg)
    task_generator, generator = cfg.task_generators(0, 0)
    stream = factory.build_estimator(cfg).unroll(
        learner, family.sample(task_generator), generator, cfg.unroll_spec()
    )
    next(stream)
    assert float(stream.states[0].rule_state["total_steps"]) == 10
    seen = []
    init_state = learner.rule.init_state
    learner.rule.init_state = lambda *a, **k: (
        seen.append(k.get("total_steps")),
        init_state(*a, **k),
    )[1]
    HeldOut(cfg, family).evaluate(learner)
    assert set(seen) == {10}


def test_each_process_evaluates_its_share_of_the_held_out_tasks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With several processes the held-out evaluation runs every ``world_size``-th task in each
    (the sum across processes fills the rest; ``tests/test_distributed.py`` launches two and
    gets one process's metric): rank 1 of 2, the sum left out, runs its own tasks alone and
    holds zeros for the others'."""
    from learned_opt import distributed
    from learned_opt.outer import factory
    from learned_opt.outer.held_out import HeldOut

    cfg = MetaTrainConfig(family="quadratic", horizon=6, truncation=6, eval_tasks=5)
    held_out = HeldOut(cfg, factory.build_family(cfg))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda tensors: None)
    ran: list[int] = []

    def one(seed: int) -> tuple[float, list[float]]:
        ran.append(seed)
        return 2.0, [3.0] * cfg.horizon

    values, curves = held_out._spread(one)
    assert ran == held_out.seeds[1::2]
    assert values == [0.0, 2.0, 0.0, 2.0, 0.0]
    assert curves.shape == (5, 6) and (curves[1::2] == 3).all() and (curves[0::2] == 0).all()


def test_a_balanced_held_out_evaluation_takes_the_mixtures_members_in_turn() -> None:
    """``eval_balanced``: held-out task k comes from member k mod n of the mixture (here the
    validation group's five, each twice), the same task its member draws from that seed; the
    metric runs on them and the tuned-Adam baseline too; a family that is no mixture is
    refused."""
    from learned_opt.outer import factory
    from learned_opt.outer.held_out import HeldOut

    cfg = MetaTrainConfig(
        family="quadratic", eval_family="validation", eval_balanced=True, eval_tasks=10,
        horizon=3, truncation=3,
    )  # fmt: skip
    mixture = factory.build_family(dataclasses.replace(cfg, family="validation"))
    held_out = HeldOut(cfg, mixture)
    names = []
    for k, seed in enumerate(held_out.seeds):
        task = held_out.family.sample(torch.Generator().manual_seed(seed))
        member = mixture.members[k % 5].sample(torch.Generator().manual_seed(seed))
        assert task.name == member.name
        names.append(task.name.split("-")[0])
    assert names == ["hastie", "friedman3", "textures", "corpus", "shapes"] * 2
    plain = [
        mixture.sample(torch.Generator().manual_seed(s)).name.split("-")[0]
        for s in HeldOut(dataclasses.replace(cfg, eval_balanced=False), mixture).seeds
    ]
    assert plain != names  # the mixture's own draws are not balanced
    learner = factory.build_learner(cfg)
    metric, curve = held_out.evaluate(learner)
    assert math.isfinite(metric) and curve.shape == (3,)
    assert held_out.adam_baseline()["lr"] > 0
    with pytest.raises(ValueError, match="mixture"):
        HeldOut(cfg, factory.build_family(cfg))  # quadratic: no members


def test_a_share_of_tasks_is_left_untold_their_horizon_by_every_estimator() -> None:
    """``untold_fraction``: each task is told its horizon or not by a deterministic draw of its
    own (about that share untold); an untold task's rule state keeps ``total_steps`` at 0 (a
    horizon-free run) in PES's particles and in backpropagated unrolls."""
    from learned_opt.outer import factory, unroll

    with pytest.raises(ValueError, match="untold_fraction"):
        MetaTrainConfig(untold_fraction=1.5)
    cfg = MetaTrainConfig(
        family="quadratic", rule="scheduled", rule_kwargs={"base": "lstm"}, horizon=10,
        truncation=5, estimator="pes", estimator_kwargs={"pairs": 1}, untold_fraction=0.5,
    )  # fmt: skip
    drawn = [cfg.task_told(i, j) for i in range(100) for j in range(4)]
    assert drawn == [cfg.task_told(i, j) for i in range(100) for j in range(4)]
    assert 0.4 < sum(drawn) / len(drawn) < 0.6
    assert all(MetaTrainConfig(**{**SMALL}).task_told(i, 0) for i in range(20))
    assert not any(MetaTrainConfig(untold_fraction=1.0).task_told(i, 0) for i in range(20))
    learner, family = factory.build_learner(cfg), factory.build_family(cfg)
    seen: list[float] = []
    learner.rule.register_forward_pre_hook(
        lambda _, args: seen.append(float(args[1]["total_steps"]))
    )
    for told in (True, False):
        task_generator, generator = cfg.task_generators(0, 0)
        task = family.sample(task_generator)
        stream = factory.build_estimator(cfg).unroll(
            learner, task, generator, cfg.unroll_spec(told=told)
        )
        next(stream)
        assert float(stream.states[0].rule_state["total_steps"]) == (10 if told else 0)
        seen.clear()
        for _ in unroll(learner, task, generator, cfg.unroll_spec(told=told)):
            pass
        assert seen == [10.0 if told else 0.0] * 10
    # the trainer tells each task as drawn
    specs = []
    trainer = MetaTrainer(dataclasses.replace(cfg, meta_batch=4, iterations=1, eval_every=0))
    original_unroll = trainer.estimator.unroll
    trainer.estimator.unroll = lambda *a, **k: (specs.append(a[3]), original_unroll(*a, **k))[1]
    trainer.train_iteration()
    assert [s.told for s in specs] == [cfg.task_told(0, j) for j in range(4)]


def test_a_learner_with_a_learned_initialization_checkpoints(tmp_path: Path) -> None:
    """The rule record of a checkpoint takes the rule's own weights out of a learner that also
    meta-trains an initialization."""
    from learned_opt import LSTMRule, load_rule
    from learned_opt.learners import OptimizerLearner
    from learned_opt.tasks.fewshot import SinusoidFamily

    family = SinusoidFamily(k_shot=5, n_query=10)
    rule = LSTMRule(hidden_size=8)
    learner = OptimizerLearner(rule, init_model=family.model)
    cfg = MetaTrainConfig(horizon=4, truncation=4, objective="test", meta_batch=1, iterations=1,
                          eval_every=0)  # fmt: skip
    MetaTrainer(cfg, learner=learner, family=family, ckpt_dir=tmp_path).train()
    loaded, _ = load_rule(tmp_path / "best.pt")
    for a, b in zip(loaded.parameters(), learner.rule.parameters()):
        assert torch.equal(a, b)


def test_the_time_budget_counts_the_evaluations(monkeypatch) -> None:
    """The elapsed time (what ``--time-budget`` bounds and the exported budget reports)
    includes the held-out evaluations, not only the unrolls."""
    import time

    trainer = MetaTrainer(MetaTrainConfig(iterations=2, **{**SMALL, "eval_every": 1}))
    evaluate = trainer.held_out.evaluate

    def slow(learner):
        time.sleep(1.5)
        return evaluate(learner)

    monkeypatch.setattr(trainer.held_out, "evaluate", slow)
    trainer.train()
    assert trainer.elapsed >= 3.0  # two timed evaluations (the one at iteration 0 is not)


def test_train_only_fixes_every_other_parameter_and_refuses_unknown_prefixes() -> None:
    """``train_only``: the meta-trainer estimates and steps only the named parameters; the
    others keep their starting values; a prefix that names nothing is an error."""
    cfg = MetaTrainConfig(
        **{**SMALL, "iterations": 1}, rule="scheduled", rule_kwargs={"base": "lstm"},
        train_only="schedule.2.",
    )  # fmt: skip
    trainer = MetaTrainer(cfg)
    named = dict(trainer.learner.rule.named_parameters())
    assert [n for n, p in named.items() if p.requires_grad] == [
        "schedule.2.weight", "schedule.2.bias"
    ]  # fmt: skip
    before = {n: p.detach().clone() for n, p in named.items()}
    trainer.train_iteration()
    changed = {n for n, p in named.items() if not torch.equal(p, before[n])}
    assert changed and changed <= {"schedule.2.weight", "schedule.2.bias"}
    with pytest.raises(ValueError, match="names none"):
        MetaTrainer(dataclasses.replace(cfg, train_only="schedule.2.,nonexistent"))


def test_the_held_out_metric_can_run_each_task_told_and_not() -> None:
    """``eval_untold``: a rule that reads the run's length is evaluated on every held-out task
    told it and not, and the metric aggregates both runs (a rule that does not read it runs
    once: the metric is unchanged)."""
    from learned_opt.outer import factory
    from learned_opt.outer.held_out import HeldOut

    cfg = MetaTrainConfig(
        family="quadratic", rule="scheduled", rule_kwargs={"base": "adam", "basis": True},
        horizon=20, eval_tasks=2, log_meta_loss=True,
    )  # fmt: skip
    learner, family = factory.build_learner(cfg), factory.build_family(cfg)
    with torch.no_grad():  # a decay to the end of a told run: told and untold runs differ
        learner.rule.basis.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
    told, _ = HeldOut(cfg, family).evaluate(learner)
    both_cfg = dataclasses.replace(cfg, eval_untold=True)
    held_out = HeldOut(both_cfg, family)
    both, _ = held_out.evaluate(learner)
    parts = held_out.parts
    with torch.no_grad():
        learner.rule.basis.weight.zero_()
    untold, _ = HeldOut(cfg, family).evaluate(learner)  # the same as an untold run
    assert told != untold
    assert both == pytest.approx(math.sqrt(told * untold), rel=1e-6)  # geometric means
    assert parts == {"told": told, "untold": pytest.approx(untold, rel=1e-6)}
    held_out.evaluate(learner)  # now a rule that reads the horizon but is the same untold
    assert held_out.parts["told"] == held_out.parts["untold"]
    plain_cfg = dataclasses.replace(cfg, rule="adam", rule_kwargs={})
    plain = factory.build_learner(plain_cfg)
    plain_held_out = HeldOut(dataclasses.replace(plain_cfg, eval_untold=True), family)
    assert plain_held_out.evaluate(plain)[0] == HeldOut(plain_cfg, family).evaluate(plain)[0]
    assert plain_held_out.parts == {}  # ran once


def test_the_held_out_adam_baseline_is_tune_lrs_choice_each_process_running_its_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tuned-Adam baseline of the held-out tasks: in one process, exactly what ``tune_lr``
    chooses on them (its metric, rate and mean curve); as rank 1 of 2 (the sum left out), only
    that rank's tasks run."""
    from learned_opt import distributed
    from learned_opt.evaluate import DEFAULT_LR_GRID, HAND_DESIGNED, mean_curve, tune_lr
    from learned_opt.outer import factory
    from learned_opt.outer import held_out as held_out_module
    from learned_opt.outer.held_out import HeldOut

    cfg = MetaTrainConfig(family="quadratic", horizon=6, truncation=6, eval_tasks=5)
    held_out = HeldOut(cfg, factory.build_family(cfg))
    baseline = held_out.adam_baseline()
    tuning = tune_lr(held_out.family, HAND_DESIGNED["adam"], held_out.seeds, 6, DEFAULT_LR_GRID,
                     name="adam", aggregate=held_out.aggregate)  # fmt: skip
    assert baseline["lr"] == tuning.lr and baseline["metric"] == tuning.scores[tuning.lr]
    assert baseline["curve"] == mean_curve(tuning.runs, skip_diverged=True).tolist()

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda tensors: None)
    ran: list[int] = []
    real = held_out_module.run_optimizer

    def counted(family, seed, *args, **kwargs):
        ran.append(seed)
        return real(family, seed, *args, **kwargs)

    monkeypatch.setattr(held_out_module, "run_optimizer", counted)
    held_out.adam_baseline()
    assert sorted(set(ran)) == sorted(held_out.seeds[1::2])
    assert len(ran) == len(held_out.seeds[1::2]) * len(DEFAULT_LR_GRID)


def test_the_held_out_metric_scores_what_the_learner_computes() -> None:
    """A learned optimizer with a learned initialization is scored from that initialization
    (not from each task's own, as the drop-in optimizer would start), and a plain one at its
    own multiplier: the selection scores the function that meta-training trains."""
    from learned_opt import LSTMRule
    from learned_opt.evaluate import run_optimizer
    from learned_opt.learners import OptimizerLearner
    from learned_opt.optim import LearnedOptimizer
    from learned_opt.outer.held_out import HeldOut
    from learned_opt.tasks.fewshot import SinusoidFamily

    family = SinusoidFamily(k_shot=5, n_query=10)
    cfg = MetaTrainConfig(horizon=4, truncation=4, objective="test", eval_tasks=2)
    rule = LSTMRule(hidden_size=8)
    rule.reset_parameters(torch.Generator().manual_seed(0))
    learner = OptimizerLearner(rule, init_model=family.model)
    held_out = HeldOut(cfg, family)
    before, _ = held_out.evaluate(learner)
    with torch.no_grad():
        for value in learner.init.values():
            value.mul_(3.0)
    after, _ = held_out.evaluate(learner)
    assert math.isfinite(before) and math.isfinite(after) and before != after

    plain = OptimizerLearner(rule, lr=0.5)
    quadratic = MetaTrainConfig(family="quadratic", horizon=6, truncation=6, eval_tasks=2)
    from learned_opt.outer import factory

    tasks = factory.build_family(quadratic)
    held_out = HeldOut(quadratic, tasks)
    metric, _ = held_out.evaluate(plain)
    at_half = [
        run_optimizer(tasks, seed, lambda p, lr: LearnedOptimizer(p, rule, lr=lr), 0.5, 6)
        for seed in held_out.seeds
    ]
    assert metric == pytest.approx(held_out.aggregate([r.final_train_loss for r in at_half]))
    assert metric != held_out.evaluate(OptimizerLearner(rule))[0]


def test_a_learner_of_ones_own_refuses_the_settings_of_the_default_one() -> None:
    """``train_only`` and ``second_order`` configure the learner the configuration builds: with
    a learner given they would be ignored, so they are refused."""
    from learned_opt import LSTMRule
    from learned_opt.learners import OptimizerLearner

    learner = OptimizerLearner(LSTMRule(hidden_size=8))
    with pytest.raises(ValueError, match="train_only"):
        MetaTrainer(MetaTrainConfig(train_only="out_", **SMALL), learner=learner)
    with pytest.raises(ValueError, match="second_order"):
        MetaTrainer(MetaTrainConfig(second_order=True, **SMALL), learner=learner)
    second = OptimizerLearner(LSTMRule(hidden_size=8), second_order=True)
    MetaTrainer(MetaTrainConfig(second_order=True, **SMALL), learner=second)  # as it says


def test_resume_refuses_a_learner_or_family_of_ones_own_set_otherwise(tmp_path: Path) -> None:
    """A checkpoint records the learner's own settings and the family trained on; a resume with
    a learner set otherwise (MAML first order instead of second) or other tasks is refused,
    and one without those records (older checkpoints) resumes."""
    from learned_opt.learners import MAMLLearner
    from learned_opt.outer.checkpoints import restore_trainer
    from learned_opt.tasks.fewshot import SinusoidFamily

    family = SinusoidFamily(k_shot=5, n_query=10)
    cfg = MetaTrainConfig(horizon=2, truncation=2, objective="test", meta_batch=1, iterations=1,
                          eval_every=0)  # fmt: skip

    def trainer(first_order: bool = False, tasks=family) -> MetaTrainer:
        learner = MAMLLearner(family.model, inner_steps=2, inner_lr=0.05, first_order=first_order)
        return MetaTrainer(cfg, learner=learner, family=tasks, ckpt_dir=tmp_path)

    trainer().train()
    assert trainer().resume()
    with pytest.raises(ValueError, match="learner_settings"):
        trainer(first_order=True).resume()
    with pytest.raises(ValueError, match="family"):
        trainer(tasks=SinusoidFamily(k_shot=3, n_query=10)).resume()
    older = trainer(first_order=True)
    state = older.state_dict()
    del state["learner_settings"]
    restore_trainer(older, state)


def test_a_fresh_run_refuses_a_directory_of_an_earlier_runs_checkpoints(tmp_path: Path) -> None:
    """Not resumed, a run there would prune the earlier run's checkpoints and replace its
    best.pt as it writes its own: refused before any work, nothing touched."""
    MetaTrainer(MetaTrainConfig(iterations=2, **SMALL), ckpt_dir=tmp_path).train()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = MetaTrainer(MetaTrainConfig(iterations=2, **{**SMALL, "seed": 5}), ckpt_dir=tmp_path)
    with pytest.raises(FileExistsError, match="earlier run.*resume it"):
        other.train()
    assert other.iteration == 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("damage", ["another-learner", "all-corrupt"])
def test_resume_refuses_when_no_checkpoint_can_be_resumed(tmp_path: Path, damage: str) -> None:
    """Every checkpoint failing (a learner built otherwise than the one that wrote them, or
    each file damaged) is an error on resume, not a fresh run: none is set aside as
    unreadable, nothing changes. (One damaged among good ones: the tests above.)"""
    from learned_opt import LSTMRule
    from learned_opt.learners import OptimizerLearner

    config = MetaTrainConfig(iterations=3, **{**SMALL, "checkpoint_every": 1})
    MetaTrainer(config, ckpt_dir=tmp_path).train()
    if damage == "all-corrupt":
        for path in find_checkpoints(tmp_path):
            path.write_bytes(bytes(path.stat().st_size))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    learner = None
    if damage == "another-learner":
        learner = OptimizerLearner(LSTMRule(hidden_size=3, num_layers=1))
    again = MetaTrainer(config, ckpt_dir=tmp_path, learner=learner)
    with pytest.raises(CheckpointError, match="None of the 3 checkpoints .* can be resumed"):
        again.resume()
    assert again.iteration == 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_checkpoints_remove_the_temporary_files_a_killed_write_left(tmp_path: Path) -> None:
    stale = [tmp_path / ".ckpt_00000001.pt.ab12.tmp", tmp_path / ".best.pt.x.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    (tmp_path / ".notes.tmp").write_bytes(b"not ours")
    MetaTrainer(MetaTrainConfig(iterations=1, **SMALL), ckpt_dir=tmp_path).train()
    assert not any(path.exists() for path in stale) and (tmp_path / ".notes.tmp").exists()


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(
    tmp_path: Path,
) -> None:
    (tmp_path / "file").write_text("a file where the folder should be")
    for dirs in ({"ckpt_dir": tmp_path / "file"}, {"log_dir": tmp_path / "file" / "tb"}):
        trainer = MetaTrainer(MetaTrainConfig(iterations=1, **SMALL), **dirs)
        with pytest.raises(OSError, match="Cannot write in .*file"):
            trainer.train()
        assert trainer.iteration == 0 and trainer.history["eval_metric"] == []


def test_a_trainer_trained_again_keeps_its_log_and_checkpoints(tmp_path: Path) -> None:
    """train() again on the same trainer (after close(), or after a budget that the first
    evaluation spent, which checkpoints at iteration 0): its own TensorBoard events stay and
    its own checkpoint does not count as an earlier run's."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    dirs = {"log_dir": tmp_path / "tb", "ckpt_dir": tmp_path / "ckpt"}
    trainer = MetaTrainer(MetaTrainConfig(iterations=2, **SMALL), **dirs)
    trainer.train()
    trainer.close()
    trainer.config = dataclasses.replace(trainer.config, iterations=4)
    trainer.train()
    trainer.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Tensors("meta/loss")] == [1, 2, 3, 4]
    spent = MetaTrainer(
        MetaTrainConfig(iterations=2, **{**SMALL, "time_budget": 1e-6}), ckpt_dir=tmp_path / "b"
    )
    spent.train()
    assert spent.iteration == 0 and find_checkpoints(tmp_path / "b")
    spent.train()  # not refused: the checkpoint is its own


def test_the_held_out_adam_baseline_ties_losses_at_float32_resolution_as_tune_lr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rates whose losses reach a millionth of the initial loss tie, the smallest winning, in
    the meta-trainer's baseline as in ``tune_lr`` (both chose a rate that drove the tasks to
    exactly zero)."""
    from learned_opt import evaluate
    from learned_opt.evaluate import DEFAULT_LR_GRID, HAND_DESIGNED, RunResult, tune_lr
    from learned_opt.outer import factory
    from learned_opt.outer import held_out as held_out_module
    from learned_opt.outer.held_out import HeldOut

    final = {lr: (0.0 if lr >= 3 else 5e-7 if lr >= 0.3 else 1.0 / (1 + lr)) for lr in
             DEFAULT_LR_GRID}  # fmt: skip

    def fake(family, seed, factory, lr, steps, name=""):  # noqa: ANN001, ANN202
        return RunResult(name, lr, seed, [2.0] * steps, final[lr], final[lr], 0.0)

    monkeypatch.setattr(held_out_module, "run_optimizer", fake)
    monkeypatch.setattr(evaluate, "run_optimizer", fake)
    cfg = MetaTrainConfig(family="quadratic", horizon=6, truncation=6, eval_tasks=3)
    held_out = HeldOut(cfg, factory.build_family(cfg))
    tuning = tune_lr(held_out.family, HAND_DESIGNED["adam"], held_out.seeds, 6, DEFAULT_LR_GRID,
                     name="adam", aggregate=held_out.aggregate)  # fmt: skip
    assert held_out.adam_baseline()["lr"] == tuning.lr == 0.3


def test_one_step_windows_of_the_training_objective_are_refused() -> None:
    """A window's training losses are measured before each of its steps: a one-step window
    scores none of its updates, and the run meta-trained nothing without a word."""
    for setting in ({"truncation": 1}, {"horizon": 1}):
        with pytest.raises(ValueError, match="no meta-gradient"):
            MetaTrainConfig(**{**SMALL, **setting})
    MetaTrainConfig(**{**SMALL, "truncation": 1, "estimator": "pes"})
    MetaTrainConfig(**{**SMALL, "truncation": 1, "objective": "final-train"})


def test_a_run_resumed_from_iteration_0_evaluates_it_once(tmp_path: Path) -> None:
    """A time budget spent by the first evaluation stops the run at iteration 0, whose
    checkpoint it writes; resumed, the run went on with a second evaluation of iteration 0."""
    config = dict(SMALL, iterations=4, eval_every=2)
    first = MetaTrainer(MetaTrainConfig(**config, time_budget=1e-9), ckpt_dir=tmp_path)
    first.train()
    assert first.iteration == 0 and first.history["eval_iteration"] == [0]
    second = MetaTrainer(MetaTrainConfig(**config), ckpt_dir=tmp_path)
    assert second.resume()
    second.train()
    assert second.history["eval_iteration"] == [0, 2, 4]


def test_a_run_that_ends_between_evaluations_says_which_weights_are_best() -> None:
    """Its last weights are not scored, so best.pt and --export are an earlier iteration's
    (with eval_every above the iterations, the untrained start's): the run says so."""
    trainer = MetaTrainer(MetaTrainConfig(**dict(SMALL, iterations=3, eval_every=2)))
    with pytest.warns(RuntimeWarning, match="ended at iteration 3, which no held-out"):
        trainer.train()
    assert trainer.history["eval_iteration"] == [0, 2]


def test_a_run_holds_its_checkpoint_directory_while_it_trains(tmp_path: Path) -> None:
    """Two runs started in one checkpoint directory before either wrote a checkpoint both
    passed the check for an earlier run's checkpoints, then overwrote each other's. The
    directory is now held while a run trains; a lock its process left on dying is taken over,
    and a run releases it when it ends, stopped or not."""
    import json
    import socket
    import subprocess
    import sys

    from learned_opt.outer.checkpoints import LOCK_NAME

    lock = tmp_path / LOCK_NAME
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        trainer = MetaTrainer(MetaTrainConfig(**dict(SMALL, iterations=2)), ckpt_dir=tmp_path)
        with pytest.raises(FileExistsError, match=f"another run \\(process {other.pid}"):
            trainer.train()
        assert not list(tmp_path.glob("ckpt_*.pt")) and lock.exists()
    finally:
        other.kill()
        other.wait()
    trainer.train()  # its holder gone: taken over, and released at the end
    assert trainer.iteration == 2 and not lock.exists()

    def stop(tr: MetaTrainer, stats: dict) -> None:
        assert json.loads(lock.read_text())["pid"] == os.getpid()  # held while it trains
        raise KeyboardInterrupt

    resumed = MetaTrainer(MetaTrainConfig(**dict(SMALL, iterations=4)), ckpt_dir=tmp_path)
    assert resumed.resume()
    with pytest.raises(KeyboardInterrupt):
        resumed.train(on_iteration=stop)
    assert not lock.exists()


def test_an_iteration_whose_every_task_diverged_says_so() -> None:
    """Every task's loss NaN from the start (NaN in the data): no window is usable and no
    meta-step taken; the run went on without a word."""
    from learned_opt.tasks.quadratic import QuadraticFamily

    class NaNTargets(QuadraticFamily):
        def sample(self, generator):
            task = super().sample(generator)
            task.train.y = task.train.y * float("nan")
            return task

    config = MetaTrainConfig(**dict(SMALL, iterations=2, eval_every=0))
    trainer = MetaTrainer(config, family=NaNTargets())
    with pytest.warns(RuntimeWarning, match="iteration 1: no task gave a usable meta-loss"):
        trainer.train()


def test_a_run_resumed_from_any_checkpoint_rolls_back_where_an_uninterrupted_one_does(
    tmp_path: Path,
) -> None:
    """A rollback returns to the last periodic checkpoint's state. A run resumed from a
    checkpoint written at its end or on an interruption (iteration 5, between the periodic
    ones at 4 and 8) rolled back to that checkpoint instead, and ended elsewhere."""

    class NaNAtIteration5(MetaTrainer):
        def _meta_step(self, grads, meta_loss, count):
            if self.iteration == 5 and grads is not None:
                grads = [None if g is None else g * float("nan") for g in grads]
            return super()._meta_step(grads, meta_loss, count)

    def config(iterations: int) -> MetaTrainConfig:
        return MetaTrainConfig(**dict(
            SMALL, iterations=iterations, eval_every=0, checkpoint_every=4, rollback_after=3,
            truncation=2, horizon=6,
        ))  # fmt: skip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (the rollbacks)
        whole = NaNAtIteration5(config(8), ckpt_dir=tmp_path / "whole")
        whole.train()
        NaNAtIteration5(config(5), ckpt_dir=tmp_path / "split").train()  # ends at 5
        resumed = NaNAtIteration5(config(8), ckpt_dir=tmp_path / "split")
        assert resumed.resume() and resumed.iteration == 5
        resumed.train()
    assert whole.rollbacks == resumed.rollbacks == 1
    for a, b in zip(_weights(whole), _weights(resumed)):
        assert torch.equal(a, b)


def test_a_run_resumes_where_its_initial_weights_file_is_gone(tmp_path: Path) -> None:
    """A checkpoint holds the whole trainer state, yet building the trainer to resume it read
    the rule from ``init_weights`` (a file a fresh machine may not have) and failed."""
    import shutil

    from learned_opt import pretrained

    init = tmp_path / "init.pt"
    shutil.copy(pretrained.path("quadratic"), init)
    config = MetaTrainConfig(**dict(SMALL, iterations=2, init_weights=str(init), rule="lstm"))
    first = MetaTrainer(config, ckpt_dir=tmp_path / "ckpt")
    first.train()
    init.unlink()
    with pytest.raises(ValueError, match="is neither a shipped name"):
        MetaTrainer(config)  # (no checkpoints to read the rule from)
    with pytest.warns(UserWarning, match="is gone: the rule's architecture is read from"):
        resumed = MetaTrainer(config, ckpt_dir=tmp_path / "ckpt")
    assert resumed.resume() and resumed.iteration == 2
    for a, b in zip(_weights(first), _weights(resumed)):
        assert torch.equal(a, b)
