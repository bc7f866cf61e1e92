"""Large tensors start at a step size scaled by their size (``lr_size_ref``)."""

from __future__ import annotations

import math

import pytest
import torch

from learned_opt import LearnedOptimizer, load_rule, pretrained, save_rule
from learned_opt.rules import per_tensor


def _default():
    return load_rule(pretrained.path("general-v2"))[0]


def test_initial_log_step_scales_with_the_square_root_of_the_size() -> None:
    rule = _default().variant(lr_size_ref=1024.0)
    state = rule.init_state(1024 + 4096 + 7, like=torch.zeros(1), numels=[1024, 4096, 7])
    torch.testing.assert_close(state["log_step"].exp(), torch.tensor([1.0, 0.5, 1.0]))
    (one,) = rule.init_state(16384, like=torch.zeros(1))["log_step"].exp()  # one whole tensor
    assert one.item() == pytest.approx(0.25)
    huge = per_tensor.initial_log_step(rule.settings, [2**62])  # never below -S
    assert huge == [-rule.settings.lr_adapt_bound]
    assert per_tensor.initial_log_step(_default().settings, [10**9]) == [0.0]  # off by default
    with pytest.raises(ValueError, match="lr_size_ref"):
        _default().variant(lr_size_ref=-1.0)


def test_small_tensors_step_exactly_as_before_and_large_ones_start_smaller() -> None:
    """Tensors of at most ``lr_size_ref`` coordinates take the unscaled rule's steps bit for bit;
    a larger one's first update is ``sqrt(ref / n)`` of the unscaled one."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(64, 64, generator=gen), torch.randn(30, generator=gen),
            torch.randn(128, 128, generator=gen)]  # fmt: skip
    grads = [[torch.randn(p.shape, generator=gen) for p in init] for _ in range(6)]
    moved = []
    for rule in (_default(), _default().variant(lr_size_ref=4096.0)):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = LearnedOptimizer(params, rule)
        deltas = []
        for step_grads in grads:
            before = [p.detach().clone() for p in params]
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
            deltas.append([p.detach() - b for p, b in zip(params, before, strict=True)])
        moved.append((params, deltas))
    (base, base_deltas), (scaled, scaled_deltas) = moved
    assert torch.equal(base[0], scaled[0]) and torch.equal(base[1], scaled[1])
    torch.testing.assert_close(scaled_deltas[0][2], base_deltas[0][2] * math.sqrt(4096 / 16384))
    assert not torch.allclose(base[2], scaled[2])


def test_the_setting_is_saved_with_the_weights(tmp_path) -> None:
    rule = _default().variant(lr_size_ref=16384.0)
    save_rule(tmp_path / "w.pt", rule, {})
    loaded, _ = load_rule(tmp_path / "w.pt")
    assert loaded.settings.lr_size_ref == 16384.0 and loaded.settings == rule.settings
