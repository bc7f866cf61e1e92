"""Atomic file writes: readers see the old file or the new one, never half of one.

The lowest layer of the library (it imports nothing of it): datasets cache with it
(:mod:`learned_opt.data`), checkpoints and weights files are written with it
(:mod:`learned_opt.checkpoint`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_save"]


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically: readers see the old file or the new one, never half.

    Args:
        obj: tensors, containers and plain Python values (loadable with ``weights_only=True``).
        path: destination; its directory is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # Make the rename itself durable.
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
