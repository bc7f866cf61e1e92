"""Atomic file writes: readers see the old file or the new one, never half of one.

The lowest layer of the library (it imports nothing of it): datasets cache with it
(:mod:`learned_opt.data`), checkpoints and weights files are written with it
(:mod:`learned_opt.checkpoint`).
"""

from __future__ import annotations

import collections
import enum
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

__all__ = ["atomic_save", "atomic_write_text", "plain_data"]

# The process's umask (read once: os.umask can only be read by setting it), so that files get
# the permissions a plain open() would give them, not mkstemp's owner-only 0600.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` atomically: readers see the old file or the new one, never half.

    Args:
        obj: tensors, containers and plain Python values, as :func:`plain_data` makes them
            (loadable with ``weights_only=True``).
        path: destination; its directory is created if needed.

    Raises:
        TypeError: ``obj`` holds a value that a safe load would refuse (before anything is
            written: the file at ``path``, if any, is kept).
    """
    obj = plain_data(obj)
    _atomic_write(path, lambda f: torch.save(obj, f))


_KEPT = (str, int, float, bool, complex, bytes, type(None))


def plain_data(obj: Any, where: str = "the object") -> Any:
    """``obj`` as a safe load (``torch.load(weights_only=True)``) reads it back: numpy scalars
    and arrays become Python numbers and lists, paths strings, enumeration members their
    values, subclasses of ``str``, ``int`` and ``float`` those types; tensors, numbers,
    strings, bytes, ``None``, ``torch.Size`` / ``dtype`` / ``device`` and dicts, lists, tuples
    and sets of them are kept (a container is rebuilt only where something in it changed).

    Raises:
        TypeError: any other value (an instance of another class, a function), naming where
            it is.
    """
    if type(obj) in _KEPT or isinstance(obj, (torch.Tensor, torch.dtype, torch.device, torch.Size)):
        return obj
    if isinstance(obj, np.generic):  # before the scalars: np.float64 is also a float
        return obj.item()
    if isinstance(obj, np.ndarray):
        return plain_data(obj.tolist(), where)  # (an object array's elements are checked)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, enum.Enum):
        return plain_data(obj.value, where)
    for kind in (bool, int, float, str):  # their subclasses (not pickled as plain values)
        if isinstance(obj, kind):
            return kind(obj) if kind is not str else str.__str__(obj)
    if type(obj) is dict or type(obj) is collections.OrderedDict:
        for key in obj:
            if plain_data(key, f"a key of {where}") is not key:
                raise TypeError(f"{where} has a key {key!r} of type {type(key).__name__}")
        items = [(k, v, plain_data(v, f"{where}[{k!r}]")) for k, v in obj.items()]
        if all(new is v for _, v, new in items):
            return obj
        made = type(obj)((k, new) for k, _, new in items)
        if hasattr(obj, "_metadata"):  # a module's state dict: the version load_state_dict reads
            made._metadata = obj._metadata  # type: ignore[attr-defined]
        return made
    if type(obj) in (list, tuple, set, frozenset):
        values = [plain_data(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return obj if all(new is v for new, v in zip(values, obj)) else type(obj)(values)
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which a safe load "
        "(torch.load(weights_only=True)) refuses: save tensors, numbers, strings, None and "
        "dicts, lists, tuples and sets of them"
    )


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
