"""Atomic file writes: readers see the old file or the new one, never half of one.

The lowest layer of the library (it imports nothing of it): datasets cache with it
(:mod:`learned_opt.data`), checkpoints and weights files are written with it
(:mod:`learned_opt.checkpoint`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["atomic_save", "atomic_write_text"]

# The process's umask (read once: os.umask can only be read by setting it), so that files get
# the permissions a plain open() would give them, not mkstemp's owner-only 0600.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically: readers see the old file or the new one, never half.

    Args:
        obj: tensors, containers and plain Python values (loadable with ``weights_only=True``).
        path: destination; its directory is created if needed.
    """
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, like :func:`atomic_save`."""
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """A temporary file in the same directory, written by ``write``, fsync'ed, renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
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
