"""Gradient checkpointing in the unroll: the same windows and meta-gradients, less memory."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from learned_opt import LSTMRule, OptimizerLearner, kernels
from learned_opt.checkpoint import safe_load
from learned_opt.cli import build_parser, main
from learned_opt.learners import MAMLLearner, MetaLearner, RNNLearner
from learned_opt.outer import MetaTrainConfig, MetaTrainer, find_checkpoints, unroll
from learned_opt.outer.grad_checkpoint import (
    CheckpointedWindow,
    checkpoint_schedule,
    checkpoint_segments,
    schedule_cost,
    sqrt_segment,
)
from learned_opt.tasks import BatchSampler, Task, make_family
from learned_opt.tasks.fewshot import SinusoidFamily


def _rule(dtype: torch.dtype) -> LSTMRule:
    rule = LSTMRule()
    rule.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        rule.out_weight.mul_(5.0)  # trajectories that move visibly in a few steps
    return rule.to(dtype)


def _run(
    learner: MetaLearner,
    task_fn,
    segment: int | tuple[int, ...] | None,
    *,
    horizon: int,
    truncation: int,
    objective: str,
    max_loss_ratio: float | None = None,
) -> tuple[list[tuple], list[torch.Tensor]]:
    """Windows (as plain values) and the meta-gradient of every window."""
    task: Task = task_fn()
    windows, grads = [], []
    for w in unroll(
        learner,
        task,
        torch.Generator().manual_seed(1),
        horizon=horizon,
        truncation=truncation,
        objective=objective,
        max_loss_ratio=max_loss_ratio,
        checkpoint_segment=segment,
    ):
        windows.append(
            (
                w.start,
                w.end,
                w.diverged,
                w.train_losses.tolist(),
                None if w.meta_loss is None else float(w.meta_loss.detach()),
            )
        )
        learner.zero_grad(set_to_none=True)
        if w.meta_loss is not None:
            w.meta_loss.backward()
        grads.append(
            torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                    for p in learner.parameters()
                ]
            )
        )
    return windows, grads


def _assert_identical(a: tuple, b: tuple) -> None:
    """The same windows and meta-gradients, bit for bit."""
    assert a[0] == b[0]
    assert len(a[1]) == len(b[1]) and any(x.abs().sum() > 0 for x in a[1])
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def _assert_same(a: tuple, b: tuple, tol: float) -> None:
    (wa, ga), (wb, gb) = a, b
    assert [w[:3] for w in wa] == [w[:3] for w in wb]
    for x, y in zip(wa, wb):
        assert x[3] == pytest.approx(y[3], rel=tol, abs=tol)
        assert (x[4] is None) == (y[4] is None)
        if x[4] is not None:
            assert x[4] == pytest.approx(y[4], rel=tol, abs=tol)
    assert len(ga) == len(gb) and any(x.abs().sum() > 0 for x in ga)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol * max(1.0, float(y.abs().max())))


FAMILIES = {
    "quadratic": (lambda: make_family("quadratic", dtype=torch.float64), torch.float64, 1e-10),
    "digits": (lambda: make_family("digits"), torch.float32, 1e-6),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("objective", ["train", "test"])
@pytest.mark.parametrize("segment", [1, 3, (3, 1), (4, 2, 1)])
def test_optimizer_learner_meta_gradients_match(
    family: str, objective: str, segment: int | tuple[int, ...]
) -> None:
    make, dtype, _ = FAMILIES[family]
    fam = make()
    learner = OptimizerLearner(_rule(dtype))
    # K = 5 is not a multiple of the segments 3 and 4, 2; the last window (3 steps) is shorter.
    kw = dict(horizon=8, truncation=5, objective=objective)

    def task() -> Task:
        return fam.sample(torch.Generator().manual_seed(0))

    _assert_identical(_run(learner, task, segment, **kw), _run(learner, task, None, **kw))


class _CountingLearner(OptimizerLearner):
    """Records the unroll step (``state.step``) of every call of :meth:`step`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[int] = []

    def step(self, task, state, batch, *, differentiable=True):
        self.calls.append(state.step)
        return super().step(task, state, batch, differentiable=differentiable)


@pytest.mark.parametrize("segment", [(4, 2, 1), (5, 2), (7, 3, 2), checkpoint_schedule(11), 2])
def test_nested_segments_match_and_follow_the_schedule(segment: tuple[int, ...] | int) -> None:
    """Windows of 11, 11 and 1 steps, none a multiple of the segments; every step runs as often
    as :func:`schedule_cost` says, at most once per level more than without checkpointing."""
    fam = make_family("quadratic", dtype=torch.float64)
    learner = _CountingLearner(_rule(torch.float64))

    def task() -> Task:
        return fam.sample(torch.Generator().manual_seed(0))

    for objective in ("train", "test"):
        kw = dict(horizon=23, truncation=11, objective=objective)
        plain = _run(learner, task, None, **kw)
        assert len(learner.calls) == 23
        learner.calls.clear()
        _assert_identical(_run(learner, task, segment, **kw), plain)
        levels = len(checkpoint_segments(segment))
        for start, steps in ((0, 11), (11, 11), (22, 1)):
            runs = [learner.calls.count(start + i) for i in range(steps)]
            cost = schedule_cost(steps, segment)
            assert sum(runs) == steps + cost["recomputed"]
            assert max(runs) == cost["max_runs"] <= levels + 1
        learner.calls.clear()


class _GlobalRNGSampler(BatchSampler):
    """Draws its batches from the global random stream: its batches are kept, not redrawn."""

    def sample(self):
        idx = torch.randint(len(self.x), (self.batch_size,))
        return self.x[idx], self.y[idx]


class _NoisyLearner(OptimizerLearner):
    """An inner step that draws from the global random stream."""

    def step(self, task, state, batch, *, differentiable=True):
        x, y = batch
        x = x + 0.1 * torch.randn_like(x)
        return super().step(task, state, (x, y), differentiable=differentiable)


@pytest.mark.parametrize("segment", [3, (4, 2, 1)])
def test_random_number_streams_are_replayed(segment: int | tuple[int, ...]) -> None:
    fam = make_family("quadratic", dtype=torch.float64)
    learner = _NoisyLearner(_rule(torch.float64))

    def task() -> Task:
        t = fam.sample(torch.Generator().manual_seed(1))
        t.train = _GlobalRNGSampler(t.train.x, t.train.y, 5, torch.Generator())
        return t

    kw = dict(horizon=14, truncation=9, objective="test")
    torch.manual_seed(5)
    plain = _run(learner, task, None, **kw)
    after_plain = torch.rand(3)
    torch.manual_seed(5)
    _assert_identical(_run(learner, task, segment, **kw), plain)
    assert torch.equal(torch.rand(3), after_plain)  # the global stream is left where it was


def test_pure_pytorch_path_and_second_order(monkeypatch: pytest.MonkeyPatch) -> None:
    fam = make_family("quadratic", dtype=torch.float64)
    kw = dict(horizon=7, truncation=7, objective="train")

    def task() -> Task:
        return fam.sample(torch.Generator().manual_seed(2))

    for second_order in (False, True):
        learner = OptimizerLearner(_rule(torch.float64), second_order=second_order)
        for segment in (3, (4, 2, 1)):
            fused = _run(learner, task, segment, **kw)
            _assert_identical(fused, _run(learner, task, None, **kw))
            with monkeypatch.context() as m:
                m.setattr(kernels, "_load", lambda: None)  # LEARNED_OPT_NO_EXT=1
                plain = _run(learner, task, segment, **kw)
                _assert_identical(plain, _run(learner, task, None, **kw))
            _assert_same(fused, plain, 1e-10)


@pytest.mark.parametrize("ratio,ends", [(1.7, {"train": 9, "test": 14}), (1.6, {"train": 8})])
def test_divergence_ends_the_unroll_the_same_way(ratio: float, ends: dict[str, int]) -> None:
    """The second window (steps 8-15; segments 8-10, 11-13, 14-15, or nested 8-12 (8-9, 10-11,
    12), 13-15 (13-14, 15)) diverges at step ``ends``: inside a segment, at the start of one, at
    the start of the window. The task draws minibatches of its rows, and its held-out batches
    from the same stream, so the "test" meta-loss after a divergence (and after the batches
    redrawn by the recomputation) also checks where the batch stream was left."""
    fam = make_family("quadratic", dtype=torch.float64)
    rule = _rule(torch.float64)
    with torch.no_grad():
        rule.out_weight.mul_(4.0)
    learner = OptimizerLearner(rule)

    def task() -> Task:
        t = fam.sample(torch.Generator().manual_seed(1))
        t.train = BatchSampler(t.train.x, t.train.y, 5, torch.Generator().manual_seed(7))
        t.test = t.train
        return t

    for objective in ("train", "test"):
        kw = dict(horizon=20, truncation=8, objective=objective, max_loss_ratio=ratio)
        plain = _run(learner, task, None, **kw)
        start, end, diverged = plain[0][-1][:3]
        assert diverged and start == 8 and end == ends.get(objective, 8)
        for segment in (3, (5, 2, 1)):
            _assert_identical(_run(learner, task, segment, **kw), plain)


def test_learned_initialization() -> None:
    """phi_0 differentiable in theta: the first segment's start state is in the graph too."""
    fam = make_family("digits")
    learner = OptimizerLearner(_rule(torch.float32), init_model=fam.model)

    def task() -> Task:
        return fam.sample(torch.Generator().manual_seed(0))

    kw = dict(horizon=5, truncation=5, objective="test")
    plain = _run(learner, task, None, **kw)
    for segment in (2, (3, 1)):
        _assert_identical(_run(learner, task, segment, **kw), plain)


@pytest.mark.parametrize("kind", ["maml", "rnn"])
def test_other_learners(kind: str) -> None:
    fam = SinusoidFamily(k_shot=5)
    torch.manual_seed(0)
    learner: MetaLearner
    if kind == "maml":  # second-order inner gradients inside the checkpointed segments
        learner = MAMLLearner(fam.model, inner_steps=5)
    else:
        learner = RNNLearner(1, 1, hidden=16)

    def task() -> Task:
        return fam.sample(torch.Generator().manual_seed(4))

    kw = dict(horizon=5, truncation=5, objective="test")
    plain = _run(learner, task, None, **kw)
    for segment in (2, (3, 1)):
        _assert_identical(_run(learner, task, segment, **kw), plain)


def test_each_step_is_recomputed_once() -> None:
    """One level: one forward and one recomputation per inner step (no quadratic re-running)."""
    fam = make_family("digits")
    learner = _CountingLearner(_rule(torch.float32))
    task = fam.sample(torch.Generator().manual_seed(0))
    for w in unroll(
        learner,
        task,
        torch.Generator().manual_seed(1),
        horizon=10,
        truncation=10,
        checkpoint_segment=3,
    ):
        assert learner.calls == list(range(10))
        w.meta_loss.backward()
    assert sorted(learner.calls) == sorted(2 * list(range(10)))


@pytest.mark.parametrize("objective", ["train", "test"])
@pytest.mark.parametrize("segment", [3, (5, 1), (9, 3, 1)])
def test_states_and_activations_alive(objective: str, segment: int | tuple[int, ...]) -> None:
    """After a window's forward pass, no saved tensor of its steps is alive and only the states
    at the level-1 segment starts are kept (no batches: they are redrawn); during its backward,
    at most as many states and steps' activations as :func:`schedule_cost` says."""
    windows: list = []
    seen: list[tuple[int, int]] = []
    init, recompute = CheckpointedWindow.__init__, CheckpointedWindow._recompute

    def tracking_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        windows.append(self)

    def tracking_recompute(self, j):
        recompute(self, j)
        live = [
            p
            for p, refs in enumerate(self.holders)
            if any(h is not None and h.value is not None for h in (r() for r in refs))
        ]
        seen.append((len(self.checkpoints), len(live)))

    fam = make_family("digits")
    learner = OptimizerLearner(_rule(torch.float32))
    task = fam.sample(torch.Generator().manual_seed(0))
    sizes = checkpoint_segments(segment)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CheckpointedWindow, "__init__", tracking_init)
        mp.setattr(CheckpointedWindow, "_recompute", tracking_recompute)
        w = next(
            unroll(
                learner,
                task,
                torch.Generator().manual_seed(1),
                horizon=20,
                truncation=20,
                objective=objective,
                checkpoint_segment=segment,
            )
        )
        (window,) = windows
        holders = [r() for refs in window.holders for r in refs]
        assert holders and all(h is None or h.value is None for h in holders)
        assert sorted(window.checkpoints) == list(range(0, 20, sizes[0]))
        assert window.batches == [] and window.sampler is task.train
        w.meta_loss.backward()
    cost = schedule_cost(20, segment)
    assert max(n for n, _ in seen) == cost["max_checkpoints"]
    assert max(n for _, n in seen) == cost["max_filled"]
    assert window.recomputed == cost["recomputed"]


def test_schedules() -> None:
    ks = (1, 5, 8, 9, 20, 64, 65, 100, 512)
    assert [checkpoint_schedule(k) for k in ks] == [
        (1,),
        (1,),
        (1,),
        (3, 1),
        (5, 1),
        (8, 1),
        (25, 5, 1),
        (25, 5, 1),
        (64, 8, 1),
    ]
    assert schedule_cost(100, 10) == dict(
        recomputed=100, max_runs=2, max_checkpoints=10, max_filled=10
    )
    assert schedule_cost(100, (25, 5, 1)) == dict(
        recomputed=260, max_runs=4, max_checkpoints=11, max_filled=1
    )
    for k in range(1, 70):
        for sizes in ((1,), (4,), (3, 1), (6, 2), (7, 3, 1), (16, 4, 2, 1), checkpoint_schedule(k)):
            cost = schedule_cost(k, sizes)
            bound = math.ceil(k / sizes[0]) + sum(
                math.ceil(min(a, k) / b) - 1 for a, b in zip(sizes, sizes[1:])
            )
            assert cost["max_checkpoints"] <= bound
            assert cost["max_runs"] <= len(sizes) + 1
            assert cost["max_filled"] == min(sizes[-1], k)


def test_invalid_segment() -> None:
    task = make_family("quadratic").sample(torch.Generator().manual_seed(0))
    learner = OptimizerLearner(LSTMRule())
    for bad in (0, (), (2, 2), (1, 2), (3, 0), "3", 2.5, (2.0, 1), True):
        with pytest.raises(ValueError, match="checkpoint_segment"):
            next(
                unroll(
                    learner,
                    task,
                    torch.Generator(),
                    horizon=4,
                    truncation=2,
                    checkpoint_segment=bad,
                )
            )
        with pytest.raises(ValueError, match="grad_checkpoint_segment"):
            MetaTrainConfig(grad_checkpoint=True, grad_checkpoint_segment=bad)
    assert [sqrt_segment(k) for k in (1, 4, 5, 20, 100)] == [1, 2, 3, 5, 10]
    # Lists (a configuration read back from JSON) and one-level tuples are normalized.
    assert MetaTrainConfig(grad_checkpoint_segment=[5, 1]).grad_checkpoint_segment == (5, 1)
    assert MetaTrainConfig(grad_checkpoint_segment=[4]).grad_checkpoint_segment == 4


SMALL = dict(
    family="quadratic",
    horizon=12,
    truncation=5,
    eval_tasks=2,
    eval_every=2,
    checkpoint_every=1,
    meta_lr=3e-3,
    meta_batch=2,
    seed=3,
)


def _weights(trainer: MetaTrainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.learner.parameters()]


def test_meta_trainer_same_weights_and_resume_across_the_setting(tmp_path: Path) -> None:
    plain = MetaTrainer(MetaTrainConfig(iterations=3, **SMALL))
    plain.train()
    ckpt = MetaTrainer(MetaTrainConfig(iterations=3, grad_checkpoint=True, **SMALL))
    assert ckpt.config.checkpoint_segment() == checkpoint_schedule(5) == (1,)
    ckpt.train()
    for a, b in zip(_weights(plain), _weights(ckpt)):
        assert torch.equal(a, b)

    # A checkpoint written without the new fields (an older version) resumes with them on.
    first = MetaTrainer(MetaTrainConfig(iterations=2, **SMALL), ckpt_dir=tmp_path)
    first.train()
    state = first.state_dict()
    for key in ("grad_checkpoint", "grad_checkpoint_segment"):
        del state["config"][key]
    second = MetaTrainer(
        MetaTrainConfig(iterations=3, grad_checkpoint=True, grad_checkpoint_segment=(3, 1), **SMALL)
    )
    second.load_state_dict(state)
    second.train()
    for a, b in zip(_weights(plain), _weights(second)):
        assert torch.equal(a, b)


def test_cli_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert not build_parser().parse_args(["meta-train"]).grad_checkpoint
    common = ["meta-train", "--horizon", "6", "--truncation", "3", "--eval-every", "0", "--quiet"]
    cases = (
        (["--grad-checkpoint"], (1,)),
        (["--grad-checkpoint-segment", "1"], 1),
        (["--grad-checkpoint-segment", "2,1"], (2, 1)),
    )
    for i, (flags, segment) in enumerate(cases):
        out = tmp_path / str(i)
        assert main([*common, *flags, "--iterations", "1", "--ckpt-dir", str(out)]) == 0
        config = MetaTrainConfig.from_dict(safe_load(find_checkpoints(out)[0])["config"])
        assert config.grad_checkpoint and config.checkpoint_segment() == segment
    with pytest.raises(SystemExit):
        build_parser().parse_args(["meta-train", "--grad-checkpoint-segment", "2;1"])
