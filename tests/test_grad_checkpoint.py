"""Gradient checkpointing in the unroll: the same windows and meta-gradients, less memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learned_opt import LSTMRule, OptimizerLearner, kernels
from learned_opt.checkpoint import safe_load
from learned_opt.cli import build_parser, main
from learned_opt.learners import MAMLLearner, MetaLearner, RNNLearner
from learned_opt.meta_train import MetaTrainConfig, MetaTrainer, find_checkpoints
from learned_opt.tasks import BatchSampler, Task, make_family
from learned_opt.tasks.fewshot import SinusoidFamily
from learned_opt.unroll import sqrt_segment, unroll


def _rule(dtype: torch.dtype) -> LSTMRule:
    rule = LSTMRule()
    rule.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        rule.out_weight.mul_(5.0)  # trajectories that move visibly in a few steps
    return rule.to(dtype)


def _run(
    learner: MetaLearner,
    task_fn,
    segment: int | None,
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
@pytest.mark.parametrize("segment", [1, 3])
def test_optimizer_learner_meta_gradients_match(family: str, objective: str, segment: int) -> None:
    make, dtype, tol = FAMILIES[family]
    fam = make()
    learner = OptimizerLearner(_rule(dtype))
    # K = 5 is not a multiple of the segment 3; the last window (3 steps) is shorter than K.
    kw = dict(horizon=8, truncation=5, objective=objective)

    def task() -> Task:
        return fam.sample(torch.Generator().manual_seed(0))

    _assert_same(_run(learner, task, segment, **kw), _run(learner, task, None, **kw), tol)


def test_pure_pytorch_path_and_second_order(monkeypatch: pytest.MonkeyPatch) -> None:
    fam = make_family("quadratic", dtype=torch.float64)
    kw = dict(horizon=7, truncation=7, objective="train")

    def task() -> Task:
        return fam.sample(torch.Generator().manual_seed(2))

    for second_order in (False, True):
        learner = OptimizerLearner(_rule(torch.float64), second_order=second_order)
        fused = _run(learner, task, 3, **kw)
        with monkeypatch.context() as m:
            m.setattr(kernels, "_load", lambda: None)  # LEARNED_OPT_NO_EXT=1
            plain = _run(learner, task, 3, **kw)
            _assert_same(plain, _run(learner, task, None, **kw), 1e-10)
        _assert_same(fused, plain, 1e-10)


@pytest.mark.parametrize("ratio,ends", [(1.7, {"train": 9, "test": 14}), (1.6, {"train": 8})])
def test_divergence_ends_the_unroll_the_same_way(ratio: float, ends: dict[str, int]) -> None:
    """The second window (steps 8-15, segments 8-10, 11-13, 14-15) diverges at step ``ends``:
    inside a segment, at the start of one, at the start of the window. The task draws
    minibatches of its rows, and its held-out batches from the same stream, so the "test"
    meta-loss after a divergence also checks where the batch stream was left."""
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
        _assert_same(_run(learner, task, 3, **kw), plain, 1e-10)


def test_learned_initialization() -> None:
    """phi_0 differentiable in theta: the first segment's start state is in the graph too."""
    fam = make_family("digits")
    learner = OptimizerLearner(_rule(torch.float32), init_model=fam.model)

    def task() -> Task:
        return fam.sample(torch.Generator().manual_seed(0))

    kw = dict(horizon=5, truncation=5, objective="test")
    _assert_same(_run(learner, task, 2, **kw), _run(learner, task, None, **kw), 1e-6)


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
    _assert_same(_run(learner, task, 2, **kw), _run(learner, task, None, **kw), 1e-5)


def test_each_step_is_recomputed_once() -> None:
    """One forward and one recomputation per inner step (no quadratic re-running)."""
    fam = make_family("digits")
    learner = OptimizerLearner(_rule(torch.float32))
    calls = []
    step = learner.step

    def counting(*args, **kwargs):
        calls.append(1)
        return step(*args, **kwargs)

    learner.step = counting  # type: ignore[method-assign]
    task = fam.sample(torch.Generator().manual_seed(0))
    for w in unroll(
        learner,
        task,
        torch.Generator().manual_seed(1),
        horizon=10,
        truncation=10,
        checkpoint_segment=3,
    ):
        assert len(calls) == 10
        w.meta_loss.backward()
    assert len(calls) == 20


def test_no_activations_are_kept_between_segments() -> None:
    """After a checkpointed window's forward pass, no saved tensor of its steps is alive."""
    import sys
    import weakref

    mod = sys.modules["learned_opt.unroll"]
    frames: list[weakref.ref] = []
    init = mod._Recompute.__init__

    def tracking(self, fn):
        init(self, fn)
        frames.append(weakref.ref(self))

    fam = make_family("digits")
    learner = OptimizerLearner(_rule(torch.float32))
    task = fam.sample(torch.Generator().manual_seed(0))
    mp = pytest.MonkeyPatch()
    mp.setattr(mod._Recompute, "__init__", tracking)
    try:
        w = next(
            unroll(
                learner,
                task,
                torch.Generator().manual_seed(1),
                horizon=9,
                truncation=9,
                checkpoint_segment=3,
            )
        )
    finally:
        mp.undo()
    assert len(frames) == 3
    holders = [h() for f in frames for h in f().holders]
    assert holders and all(h is None or h.value is None for h in holders)
    w.meta_loss.backward()


def test_invalid_segment() -> None:
    task = make_family("quadratic").sample(torch.Generator().manual_seed(0))
    learner = OptimizerLearner(LSTMRule())
    with pytest.raises(ValueError, match="checkpoint_segment"):
        next(
            unroll(learner, task, torch.Generator(), horizon=4, truncation=2, checkpoint_segment=0)
        )
    with pytest.raises(ValueError, match="grad_checkpoint_segment"):
        MetaTrainConfig(grad_checkpoint=True, grad_checkpoint_segment=0)
    assert [sqrt_segment(k) for k in (1, 4, 5, 20, 100)] == [1, 2, 3, 5, 10]


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
    assert ckpt.config.checkpoint_segment() == 3
    ckpt.train()
    for a, b in zip(_weights(plain), _weights(ckpt)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    # A checkpoint written without the new fields (an older version) resumes with them on.
    first = MetaTrainer(MetaTrainConfig(iterations=2, **SMALL), ckpt_dir=tmp_path)
    first.train()
    state = first.state_dict()
    for key in ("grad_checkpoint", "grad_checkpoint_segment"):
        del state["config"][key]
    second = MetaTrainer(
        MetaTrainConfig(iterations=3, grad_checkpoint=True, grad_checkpoint_segment=2, **SMALL)
    )
    second.load_state_dict(state)
    second.train()
    for a, b in zip(_weights(plain), _weights(second)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_cli_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert not build_parser().parse_args(["meta-train"]).grad_checkpoint
    common = ["meta-train", "--horizon", "6", "--truncation", "3", "--eval-every", "0", "--quiet"]
    for flags, segment in ((["--grad-checkpoint"], 2), (["--grad-checkpoint-segment", "1"], 1)):
        out = tmp_path / str(segment)
        assert main([*common, *flags, "--iterations", "1", "--ckpt-dir", str(out)]) == 0
        config = MetaTrainConfig.from_dict(safe_load(find_checkpoints(out)[0])["config"])
        assert config.grad_checkpoint and config.checkpoint_segment() == segment
