"""Few-shot task families: sinusoid regression and N-way K-shot digits."""

from __future__ import annotations

import pytest
import torch

from learned_opt.data import load_digits
from learned_opt.tasks import (
    FAMILIES,
    DigitsFewShotFamily,
    SinusoidFamily,
    make_family,
)
from learned_opt.tasks.fewshot import DIGIT_CLASSES


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def digit_of() -> dict[tuple[float, ...], int]:
    """The label of each (unique) digits image."""
    x, y = load_digits()
    return {tuple(r): int(c) for r, c in zip(x.tolist(), y.tolist())}


def test_families_are_registered() -> None:
    assert isinstance(make_family("sinusoid"), SinusoidFamily)
    assert isinstance(make_family("digits-fewshot"), DigitsFewShotFamily)
    assert FAMILIES["digits-fewshot"][1]["n_way"] == 5
    fam = make_family("digits-fewshot", k_shot=3, split="test")
    assert fam.config() == {
        "name": "digits-fewshot",
        "n_way": 5,
        "k_shot": 3,
        "n_query": 15,
        "split": "test",
        "augment": False,
        "shift": 0,
        "hidden": [64],
    }


def test_sinusoid_shapes_and_ranges() -> None:
    fam = SinusoidFamily(k_shot=7, n_query=30)
    task = fam.sample(_gen(0))
    xs, ys = task.train.full()
    xq, yq = task.test.full()
    assert xs.shape == ys.shape == (7, 1) and xq.shape == yq.shape == (30, 1)
    assert task.train.sample()[0] is xs  # the whole support set, every time
    for x, y in ((xs, ys), (xq, yq)):
        assert x.dtype == y.dtype == torch.float32
        assert x.abs().max() <= 5.0 and y.abs().max() <= 5.0
    params = task.init_params(_gen(1))
    assert [tuple(p.shape) for p in params.values()] == [
        (40, 1),
        (40,),
        (40, 40),
        (40,),
        (1, 40),
        (1,),
    ]
    loss = task.loss(params, (xs, ys))
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_sinusoid_support_and_query_share_one_sinusoid() -> None:
    task = SinusoidFamily(k_shot=5, n_query=40).sample(_gen(3))
    x = torch.cat((task.train.full()[0], task.test.full()[0])).squeeze(1).double()
    y = torch.cat((task.train.full()[1], task.test.full()[1])).squeeze(1).double()
    # y = A sin(x - p) = a sin(x) + b cos(x): an exact linear fit over both sets.
    basis = torch.stack((torch.sin(x), torch.cos(x)), dim=1)
    coef = torch.linalg.lstsq(basis, y.unsqueeze(1)).solution
    torch.testing.assert_close(basis @ coef, y.unsqueeze(1), atol=1e-5, rtol=0)
    amplitude = float(coef.norm())
    assert 0.1 <= amplitude <= 5.0


def test_sinusoid_splits_are_deterministic_independent_streams() -> None:
    train, test = SinusoidFamily(), SinusoidFamily(split="test")
    a, b = train.sample(_gen(5)), train.sample(_gen(5))
    assert torch.equal(a.train.full()[1], b.train.full()[1])
    c = test.sample(_gen(5))
    assert not torch.equal(a.train.full()[0], c.train.full()[0])
    assert train.sample(_gen(6)).name != a.name
    with pytest.raises(ValueError, match="split"):
        SinusoidFamily(split="val")


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("n_way,k_shot", [(5, 1), (3, 4)])
def test_digits_tasks(
    split: str, n_way: int, k_shot: int, digit_of: dict[tuple[float, ...], int]
) -> None:
    fam = DigitsFewShotFamily(n_way=n_way, k_shot=k_shot, n_query=6, split=split)
    task = fam.sample(_gen(11))
    xs, ys = task.train.full()
    xq, yq = task.test.full()
    assert xs.shape == (n_way * k_shot, 64) and xq.shape == (n_way * 6, 64)
    assert ys.dtype == yq.dtype == torch.int64
    assert torch.bincount(ys, minlength=n_way).tolist() == [k_shot] * n_way
    assert torch.bincount(yq, minlength=n_way).tolist() == [6] * n_way
    assert len(set(task.classes)) == n_way and set(task.classes) <= set(DIGIT_CLASSES[split])
    # Every image belongs to the digit its re-indexed label stands for.
    for x, y in ((xs, ys), (xq, yq)):
        for row, label in zip(x.tolist(), y.tolist()):
            assert digit_of[tuple(row)] == task.classes[label]
    assert not {tuple(r) for r in xs.tolist()} & {tuple(r) for r in xq.tolist()}
    logits = task.model(xq)
    assert logits.shape == (n_way * 6, n_way)
    assert torch.isfinite(task.loss(task.init_params(_gen(0)), (xs, ys)))


def test_digits_splits_use_disjoint_classes() -> None:
    assert not set(DIGIT_CLASSES["train"]) & set(DIGIT_CLASSES["test"])
    assert set(DIGIT_CLASSES["train"]) | set(DIGIT_CLASSES["test"]) == set(range(10))
    seen = {"train": set(), "test": set()}
    for split in seen:
        fam = DigitsFewShotFamily(n_way=2, split=split)
        for seed in range(20):
            seen[split] |= set(fam.sample(_gen(seed)).classes)
    assert seen["train"] == set(DIGIT_CLASSES["train"])
    assert seen["test"] == set(DIGIT_CLASSES["test"])


def test_digits_labels_are_shuffled_and_deterministic() -> None:
    fam = DigitsFewShotFamily(n_way=5, k_shot=2, n_query=3)
    orders = {fam.sample(_gen(s)).classes for s in range(10)}
    assert len(orders) > 1  # the label -> class mapping changes between tasks
    a, b = fam.sample(_gen(4)), fam.sample(_gen(4))
    assert a.classes == b.classes and torch.equal(a.train.full()[0], b.train.full()[0])
    ys = a.train.full()[1]
    assert not torch.equal(ys, ys.sort().values)  # support set is shuffled


def test_digits_rejects_bad_configurations() -> None:
    with pytest.raises(ValueError, match="n_way"):
        DigitsFewShotFamily(n_way=6)
    with pytest.raises(ValueError, match="split"):
        DigitsFewShotFamily(split="val")
    with pytest.raises(ValueError, match="exceeds"):
        DigitsFewShotFamily(k_shot=100, n_query=100)


def test_mnist_fewshot_tasks_use_the_class_split_and_a_conv_net() -> None:
    from learned_opt.data import load_mnist
    from learned_opt.tasks import MNISTFewShotFamily

    x, y = load_mnist("train")
    assert isinstance(make_family("mnist-fewshot"), MNISTFewShotFamily)
    for split in ("train", "test"):
        fam = MNISTFewShotFamily(n_way=3, k_shot=2, n_query=4, split=split, channels=4)
        task = fam.sample(_gen(3))
        xs, ys = task.train.full()
        assert xs.shape == (6, 784) and torch.bincount(ys).tolist() == [2, 2, 2]
        assert set(task.classes) <= set(DIGIT_CLASSES[split])
        # The support images are MNIST images of the classes their labels stand for.
        first = xs[0]
        match = (x == first).all(1).nonzero().flatten()
        assert len(match) >= 1 and int(y[match[0]]) == task.classes[int(ys[0])]
        assert any(isinstance(m, torch.nn.Conv2d) for m in task.model.modules())
        assert task.model(xs).shape == (6, 3)
        assert torch.isfinite(task.loss(task.init_params(_gen(0)), (xs, ys)))
    assert MNISTFewShotFamily(channels=4).config()["channels"] == 4
    with pytest.raises(ValueError, match="channels"):
        MNISTFewShotFamily(channels=0)


def test_shift_translates_each_image_of_the_same_task() -> None:
    """shift=s: the same classes, labels and images as without it, each moved by its own offset
    in [-s, s]^2 with zeros filled in; shift=0 is the plain family."""
    plain = DigitsFewShotFamily(n_way=3, k_shot=2, n_query=4)
    moved = DigitsFewShotFamily(n_way=3, k_shot=2, n_query=4, shift=1)
    assert moved.config()["shift"] == 1 and plain.config()["shift"] == 0
    a = plain.sample(torch.Generator().manual_seed(5))
    b = moved.sample(torch.Generator().manual_seed(5))
    assert a.classes == b.classes
    offsets = set()
    for sa, sb in ((a.train, b.train), (a.test, b.test)):
        (xa, ya), (xb, yb) = sa.full(), sb.full()
        assert torch.equal(ya, yb)
        for img_a, img_b in zip(xa.view(-1, 8, 8), xb.view(-1, 8, 8)):
            padded = torch.nn.functional.pad(img_a, (1, 1, 1, 1))
            found = [
                (r, c)
                for r in range(3)
                for c in range(3)
                if torch.equal(padded[r : r + 8, c : c + 8], img_b)
            ]
            assert found, "not a translation of the unshifted image"
            offsets.update(found)
    assert len(offsets) > 3  # images move independently
    with pytest.raises(ValueError, match="shift"):
        DigitsFewShotFamily(shift=4)
