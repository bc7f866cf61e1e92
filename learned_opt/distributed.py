"""Data-parallel meta-training over ``torch.distributed`` (gloo: meta-training runs on CPU).

Meta-training is embarrassingly parallel over tasks: of the ``meta_batch`` tasks of an iteration,
rank r unrolls tasks r, r + N, r + 2N, ... (so N processes meta-train on exactly the tasks of one
process, and a checkpoint resumes with any N that divides ``meta_batch``), the meta-gradients are
averaged with ``all_reduce``, and every rank applies the same update, so the rule weights stay
identical on every rank. Launch
with ``torchrun``; its rendezvous flags give multi-node runs.
"""

from __future__ import annotations

import datetime
import io
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "init_from_env",
    "rank",
    "world_size",
    "is_main",
    "all_reduce_sum",
    "all_reduce_max",
    "broadcast_state",
    "barrier",
    "shutdown",
]


def init_from_env(timeout_s: float = 1800.0) -> bool:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1).

    A rank that dies makes the collectives of the others fail after ``timeout_s`` seconds with an
    error, instead of hanging forever.

    Returns:
        whether a multi-process group is active.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    # Import torch._dynamo before the group exists. Imported after it (constructing any
    # torch.optim optimizer imports it), it keeps references to the default group, so
    # destroy_process_group() no longer frees the group: its gloo backend is then destroyed during
    # interpreter shutdown, which intermittently aborts a rank whose work is done (SIGABRT,
    # "terminate called without an active exception"). tests/test_distributed.py checks that
    # shutdown() frees the group.
    import torch._dynamo  # noqa: F401

    # gloo, also where CUDA is available: the meta-gradients and statistics reduced here are CPU
    # tensors, which NCCL cannot reduce.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    """Leave the process group (every rank, at the end of its work); a no-op without one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum tensors across ranks, in place, as one flat buffer (one collective)."""
    if not _active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_max(value: float) -> float:
    """The largest ``value`` over ranks (the value itself in a single process)."""
    if not _active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def broadcast_state(state: Any) -> Any:
    """Rank 0's ``state`` (tensors and plain containers, or ``None``) on every process. It
    travels as ``torch.save`` bytes and is read back with ``weights_only=True``."""
    if not _active():
        return state
    size = torch.tensor([-1])  # -1: None
    if rank() == 0 and state is not None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        size[0] = payload.numel()
    dist.broadcast(size, src=0)
    if int(size) < 0:
        return None
    if rank() != 0:
        payload = torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(payload, src=0)
    if rank() == 0:
        return state
    return torch.load(io.BytesIO(payload.numpy().tobytes()), weights_only=True)


def barrier() -> None:
    if _active():
        dist.barrier()
