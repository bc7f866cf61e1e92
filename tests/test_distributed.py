"""Real 2-process launches with torchrun (gloo on CPU)."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from learned_opt import load_rule
from learned_opt.outer import MetaTrainConfig, MetaTrainer, find_checkpoints

HERE = Path(__file__).resolve().parent


def _torchrun(*args: str, nproc: int = 2, timeout: float = 240) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *args,
    ]
    # faulthandler: a rank that aborts prints every thread's Python stack
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    proc = _run_group(cmd, timeout, env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-12000:]


def _run_group(
    cmd: list[str], timeout: float, env: dict | None = None
) -> subprocess.CompletedProcess:
    """``subprocess.run`` whose timeout kills the launcher's whole process group: killing
    torchrun alone leaves its ranks holding the output pipes (and waiting in a collective for
    up to the process group's timeout), and ``run`` would wait for them."""
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    ) as proc:  # fmt: skip
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"timed out after {timeout} s: {cmd}\n{err[-12000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _worker_config() -> dict:
    """The configuration ``dist_worker.py`` meta-trains with (its launch code does not run)."""
    return runpy.run_path(str(HERE / "dist_worker.py"))["CONFIG"]


def test_two_ranks_hold_identical_weights_equal_to_one_process(tmp_path: Path) -> None:
    _torchrun(str(HERE / "dist_worker.py"), str(tmp_path))
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for a, b in zip(rank0, rank1):
        assert torch.equal(a, b)  # identical on every rank
    for r in (0, 1):  # shutdown() freed the process group (no teardown at interpreter exit)
        assert (tmp_path / f"rank{r}_group_freed.txt").read_text() == "True"
    # logged: every rank's tasks, the same on each rank and as one process logs them (tasks of
    # different lengths: a rank whose tasks ended takes part in later rounds without a loss)
    stats = [json.loads((tmp_path / f"rank{r}_stats.json").read_text()) for r in (0, 1)]
    assert stats[0]["logged"] == stats[1]["logged"]
    single_logged = []
    single = MetaTrainer(MetaTrainConfig(**_worker_config()))
    single.train(on_iteration=lambda trainer, s: single_logged.append(dict(s)))
    for it, logged in enumerate(stats[0]["logged"]):
        own = [s["own"][it] for s in stats]
        assert own[0]["meta_loss"] != own[1]["meta_loss"]  # the ranks unroll different tasks
        assert logged["meta_loss"] == pytest.approx(single_logged[it]["meta_loss"], rel=1e-5)
        assert logged["diverged"] == own[0]["diverged"] + own[1]["diverged"]
    for a, b in zip(rank0, single.learner.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_cli_under_torchrun_rank0_writes_and_resume_with_other_world_size(tmp_path: Path) -> None:
    args = [
        "--family",
        "quadratic",
        "--horizon",
        "10",
        "--truncation",
        "5",
        "--meta-batch",
        "2",
        "--eval-every",
        "2",
        "--eval-tasks",
        "2",
        "--checkpoint-every",
        "1",
        "--seed",
        "2",
        "--ckpt-dir",
        str(tmp_path / "ckpt"),
        "--log-dir",
        str(tmp_path / "tb"),
        "--quiet",
    ]
    _torchrun("-m", "learned_opt", "meta-train", *args, "--iterations", "2")
    assert [p.name for p in find_checkpoints(tmp_path / "ckpt")][0] == "ckpt_00000002.pt"
    two = torch.load(find_checkpoints(tmp_path / "ckpt")[0], weights_only=True)["history"]
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1  # rank 0 only
    # Resume in a single process and finish; compare with a single process from scratch.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "learned_opt",
            "meta-train",
            *args,
            "--iterations",
            "4",
            "--resume",
            "--export",
            str(tmp_path / "w.pt"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    straight = MetaTrainer(
        MetaTrainConfig(
            family="quadratic",
            horizon=10,
            truncation=5,
            meta_batch=2,
            iterations=4,
            eval_every=2,
            eval_tasks=2,
            checkpoint_every=1,
            seed=2,
        )
    )
    straight.train()
    # the held-out evaluation, each process running one of the two tasks: the same metric
    assert two["eval_iteration"] == [0, 2] == straight.history["eval_iteration"][:2]
    assert two["eval_metric"] == pytest.approx(straight.history["eval_metric"][:2], rel=1e-5)
    final = torch.load(find_checkpoints(tmp_path / "ckpt")[0], weights_only=True)
    assert final["iteration"] == 4
    # the tuned-Adam baseline too (computed by the two processes, kept by the resumed run)
    assert final["adam_baseline"]["lr"] == straight.adam_baseline["lr"]
    assert final["adam_baseline"]["metric"] == pytest.approx(
        straight.adam_baseline["metric"], rel=1e-6
    )
    resumed = MetaTrainer(MetaTrainConfig.from_dict(final["config"]))
    resumed.load_state_dict(final)
    for a, b in zip(resumed.learner.parameters(), straight.learner.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    rule, meta = load_rule(tmp_path / "w.pt")
    assert meta["budget"]["processes"] == 1


def test_a_dying_rank_stops_the_job_with_an_error(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(HERE / "dist_worker.py"),
        str(tmp_path),
        "die",
    ]
    proc = _run_group(cmd, 180)
    assert proc.returncode != 0
    assert "exitcode" in proc.stderr or "failed" in proc.stderr.lower()
    assert not (tmp_path / "rank0.pt").exists()


def test_ranks_given_different_configurations_are_refused_on_every_rank(tmp_path: Path) -> None:
    """Command lines that differ between machines: the ranks trained apart (another meta
    learning rate) or stalled in mismatched collectives (another horizon)."""
    _torchrun(str(HERE / "dist_worker.py"), str(tmp_path), "disagree")
    refused = [(tmp_path / f"rank{r}_refused.txt").read_text() for r in (0, 1)]
    assert all("different configurations" in text for text in refused)
    assert "['meta_lr']" in refused[1] and "another process" in refused[0]


def test_torchrun_stopped_by_sigterm_saves_the_last_completed_iteration(tmp_path: Path) -> None:
    # What a job scheduler's preemption does: SIGTERM to torchrun, which sends it to the ranks.
    ckpt = tmp_path / "ckpt"
    args = [
        "--family", "quadratic", "--horizon", "10", "--truncation", "5", "--meta-batch", "2",
        "--eval-every", "2", "--eval-tasks", "2", "--checkpoint-every", "5", "--seed", "2",
        "--ckpt-dir", str(ckpt), "--quiet",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    with subprocess.Popen(
        [*cmd, "-m", "learned_opt", "meta-train", *args, "--iterations", "1000000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    ) as proc:  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not find_checkpoints(ckpt):  # 5 iterations done
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.1)
            time.sleep(0.5)  # (some more, most likely)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    iteration = torch.load(find_checkpoints(ckpt)[0], weights_only=True)["iteration"]
    assert iteration >= 5
    if iteration % 5:  # stopped between two periodic checkpoints: that iteration was saved
        assert f"last completed iteration ({iteration}) is saved" in err, err[-4000:]
    resumed = subprocess.run(
        [sys.executable, "-m", "learned_opt", "meta-train", *args, "--iterations",
         str(iteration + 1), "--resume"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at iteration {iteration}" in resumed.stderr


def test_meta_batch_must_be_divisible_by_world_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from learned_opt import distributed

    config = MetaTrainConfig(family="quadratic", horizon=4, truncation=2, meta_batch=3)
    trainer = MetaTrainer(config)  # one process
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        trainer.train_iteration()
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        MetaTrainer(config)  # at the start, before the first held-out evaluation


def test_processes_without_a_shared_filesystem_resume_rank_0s_checkpoint(tmp_path: Path) -> None:
    """Each process has its own --ckpt-dir (two machines without a shared filesystem) and only
    rank 0's holds the checkpoint (only rank 0 writes them): both resume its state."""
    trainer = MetaTrainer(
        MetaTrainConfig(**{**_worker_config(), "iterations": 1}),
        ckpt_dir=tmp_path / "ckpt0",
    )
    trainer.train()
    _torchrun(str(HERE / "dist_worker.py"), str(tmp_path), "resume-split")
    assert not find_checkpoints(tmp_path / "ckpt1")
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}_resume.pt", weights_only=True)
        assert got["resumed"] and got["iteration"] == 1
        for a, b in zip(got["weights"], trainer.learner.parameters()):
            assert torch.equal(a, b.detach())


def test_the_process_group_is_gloo_also_where_cuda_is_available(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reduced meta-gradients are CPU tensors: NCCL, which only reduces CUDA tensors, would
    fail at the first all-reduce on a machine with a GPU."""
    from learned_opt import distributed

    backends = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda backend, **kw: backends.append(backend)
    )
    assert distributed.init_from_env()
    assert backends == ["gloo"]
