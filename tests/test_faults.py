"""Fault injection: runs killed with SIGKILL resume to the same result; hostile optimizer input."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from learned_opt import LSTMOptimizer, LSTMRule, load_rule
from learned_opt.outer import MetaTrainConfig, MetaTrainer, find_checkpoints

ARGS = [
    "--family",
    "quadratic",
    "--horizon",
    "30",
    "--truncation",
    "5",
    "--iterations",
    "40",
    "--eval-every",
    "4",
    "--eval-tasks",
    "2",
    "--checkpoint-every",
    "1",
    "--seed",
    "11",
    "--meta-lr",
    "3e-3",
    "--quiet",
]


def test_sigkill_at_random_points_then_resume_matches_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pure-PyTorch path everywhere: a process killed while compiling the optional kernels is
    # not what this test is about, and both sides must run the same arithmetic.
    from learned_opt import kernels

    monkeypatch.setenv("LEARNED_OPT_NO_EXT", "1")
    monkeypatch.setattr(kernels, "_EXT", None)
    monkeypatch.setattr(kernels, "_TRIED", True)
    # Bit-exact comparison: matrix products round differently with other thread counts.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _sigkill_and_compare(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _sigkill_and_compare(tmp_path: Path) -> None:
    reference = MetaTrainer(
        MetaTrainConfig(
            family="quadratic",
            horizon=30,
            truncation=5,
            iterations=40,
            eval_every=4,
            eval_tasks=2,
            checkpoint_every=1,
            seed=11,
            meta_lr=3e-3,
        )
    )
    reference.train()

    ckpt = tmp_path / "ckpt"
    cmd = [
        sys.executable,
        "-m",
        "learned_opt",
        "meta-train",
        *ARGS,
        "--ckpt-dir",
        str(ckpt),
        "--resume",
    ]
    rng = random.Random(0)
    kills = 0
    for _ in range(5):
        before = len(find_checkpoints(ckpt)) and find_checkpoints(ckpt)[0].name
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            newest = find_checkpoints(ckpt)[0].name if find_checkpoints(ckpt) else None
            if newest and newest != before:
                break
            time.sleep(0.02)
        # a random moment inside the next iteration or two (an iteration takes tens of ms on
        # a fast machine: a longer wait lets five runs finish all 40 before the fifth kill)
        time.sleep(rng.uniform(0.0, 0.1))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills == 5, "the run finished before it could be killed five times"
    subprocess.run(
        cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300
    )

    final = torch.load(find_checkpoints(ckpt)[0], weights_only=True)
    assert final["iteration"] == 40
    resumed = MetaTrainer(MetaTrainConfig.from_dict(final["config"]))
    resumed.load_state_dict(final)
    for a, b in zip(reference.learner.parameters(), resumed.learner.parameters()):
        assert torch.equal(a, b)
    assert reference.history == resumed.history
    rule, _ = load_rule(ckpt / "best.pt")
    assert isinstance(rule, LSTMRule)


finite_or_not = st.one_of(
    st.floats(min_value=-1e30, max_value=1e30, allow_nan=False),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e-30, -1e-30, 0.0]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    values=st.lists(finite_or_not, min_size=1, max_size=8),
    present=st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_hostile_gradients_never_silently_corrupt_parameters(shapes, dtype, values, present):
    rule = LSTMRule()
    params = [torch.nn.Parameter(torch.ones(s, dtype=dtype)) for s in shapes]
    opt = LSTMOptimizer(params[:1], weights=rule)
    for step in range(3):
        if step == 1 and len(params) > 1:
            opt.add_param_group({"params": params[1:]})  # parameters added mid-training
        for i, p in enumerate(params):
            if not present[(i + step) % 3]:  # gradients appear and disappear between steps
                p.grad = None
                continue
            flat = torch.tensor(
                [values[(i + k) % len(values)] for k in range(p.numel())], dtype=dtype
            )
            p.grad = flat.reshape(p.shape)
        before = [p.detach().clone() for p in params]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        skipped = any("non-finite" in str(w.message) for w in caught)
        managed = {id(q) for g in opt.param_groups for q in g["params"]}
        for p, b in zip(params, before):
            assert torch.isfinite(p).all(), "a parameter became non-finite"
            if id(p) not in managed:
                assert torch.equal(p, b)
            elif p.grad is not None and not torch.isfinite(p.grad).all():
                assert torch.equal(p, b) and skipped, "a non-finite gradient was not skipped"


@pytest.mark.parametrize("numel", [0, 1, 3_000_001])
def test_huge_tiny_and_empty_parameters(numel: int) -> None:
    p = torch.nn.Parameter(torch.zeros(numel))
    opt = LSTMOptimizer([p], weights=LSTMRule())
    grad = torch.logspace(-30, 30, max(numel, 1))[:numel]
    grad[::2] *= -1
    p.grad = grad
    opt.step()
    assert torch.isfinite(p).all() and p.shape == (numel,)
    if numel:
        assert p.abs().sum() > 0


def _small_config(**changes) -> MetaTrainConfig:
    settings = dict(
        family="quadratic", horizon=30, truncation=5, iterations=6, eval_every=2, eval_tasks=2,
        checkpoint_every=100, seed=11, meta_lr=3e-3,
    )  # fmt: skip
    return MetaTrainConfig(**{**settings, **changes})


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_run_saves_its_last_completed_iteration_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[BaseException]
) -> None:
    reference = MetaTrainer(_small_config())
    reference.train()

    trainer = MetaTrainer(_small_config(), ckpt_dir=tmp_path)
    original = trainer.train_iteration

    def fourth_fails() -> dict:
        if trainer.iteration == 3:
            original()  # half-way through (its meta-steps taken), then interrupted
            raise error("stop")
        return original()

    monkeypatch.setattr(trainer, "train_iteration", fourth_fails)
    saved = r"last completed iteration \(3\) is saved"
    with pytest.warns(RuntimeWarning, match=saved), pytest.raises(error):
        trainer.train()
    assert [p.name for p in find_checkpoints(tmp_path)] == ["ckpt_00000003.pt"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back

    resumed = MetaTrainer(_small_config(), ckpt_dir=tmp_path)
    assert resumed.resume() and resumed.iteration == 3
    resumed.train()
    for a, b in zip(reference.learner.parameters(), resumed.learner.parameters()):
        assert torch.equal(a, b)
    assert reference.history == resumed.history


def test_an_interruption_before_any_completed_iteration_writes_nothing(tmp_path: Path) -> None:
    trainer = MetaTrainer(_small_config(), ckpt_dir=tmp_path)

    def interrupt() -> dict:
        raise KeyboardInterrupt

    trainer.train_iteration = interrupt  # type: ignore[method-assign]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to report either
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
    assert find_checkpoints(tmp_path) == []


_SIGNAL_AT_ITERATION_3 = """
import os, signal, sys
from learned_opt import cli
from learned_opt.outer import MetaTrainer

train_iteration = MetaTrainer.train_iteration

def signalled(self):
    if self.iteration == 2:
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return train_iteration(self)

MetaTrainer.train_iteration = signalled
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize(("name", "status"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_the_cli_saves_the_last_completed_iteration_when_signalled(
    tmp_path: Path, name: str, status: int
) -> None:
    ckpt = tmp_path / "ckpt"
    args = [*ARGS, "--ckpt-dir", str(ckpt), "--resume", "--checkpoint-every", "100"]
    args[args.index("--iterations") + 1] = "5"
    run = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AT_ITERATION_3, name, "meta-train", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == status, run.stderr
    assert "last completed iteration (2) is saved" in run.stderr
    assert "Traceback" not in run.stderr
    assert [p.name for p in find_checkpoints(ckpt)] == ["ckpt_00000002.pt"]
    again = subprocess.run(
        [sys.executable, "-m", "learned_opt", "meta-train", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "resumed at iteration 2" in again.stderr
    assert torch.load(find_checkpoints(ckpt)[0], weights_only=True)["iteration"] == 5


def test_interrupted_writing_a_checkpoint_the_run_keeps_it_and_writes_no_older_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = MetaTrainer(_small_config(checkpoint_every=2), ckpt_dir=tmp_path)
    save = trainer.save_checkpoint

    def interrupted_after_its_file() -> None:  # (as in the write of its best.pt)
        save()
        if trainer.iteration == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", interrupted_after_its_file)
    saved = r"last completed iteration \(4\) is saved"  # again, whole; nothing older
    with pytest.warns(RuntimeWarning, match=saved), pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert [p.name for p in find_checkpoints(tmp_path)] == ["ckpt_00000004.pt", "ckpt_00000002.pt"]
    assert load_rule(tmp_path / "best.pt")[1]["iteration"] == 4


def test_sigterm_while_the_last_iteration_is_saved_waits_for_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun terminates the other ranks when one fails: rank 0, saving after the failed
    collective, finishes its write, then exits as terminated (143)."""
    from learned_opt.outer import checkpoints

    trainer = MetaTrainer(_small_config(), ckpt_dir=tmp_path)
    original = trainer.train_iteration
    write = checkpoints.write_checkpoint

    def fails_at_the_fourth() -> dict:
        if trainer.iteration == 3:
            raise RuntimeError("Connection closed by peer")
        return original()

    def terminated_meanwhile(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        os.kill(os.getpid(), signal.SIGTERM)
        return write(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_iteration", fails_at_the_fourth)
    monkeypatch.setattr(checkpoints, "write_checkpoint", terminated_meanwhile)
    saved = r"iteration \(3\) is saved"
    with pytest.warns(RuntimeWarning, match=saved), pytest.raises(SystemExit) as stopped:
        trainer.train()
    assert stopped.value.code == 143 and isinstance(stopped.value.__cause__, RuntimeError)
    assert [p.name for p in find_checkpoints(tmp_path)] == ["ckpt_00000003.pt"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
