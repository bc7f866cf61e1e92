from __future__ import annotations

import math

import pytest
import torch

from learned_opt.preprocess import log_sign


@pytest.mark.parametrize("p", [5.0, 10.0])
def test_log_sign_matches_the_paper_formula(p: float) -> None:
    g = torch.tensor([3.0, -2e-3, 1e-6, -1e-7, 0.0, math.exp(-p)], dtype=torch.float64)
    out = log_sign(g, p)
    for gi, (a, b) in zip(g.tolist(), out.tolist()):
        if abs(gi) >= math.exp(-p):
            assert a == pytest.approx(math.log(abs(gi)) / p)
            assert b == (1.0 if gi > 0 else -1.0)
        else:
            assert a == -1.0
            assert b == pytest.approx(math.exp(p) * gi)


def test_log_sign_derivatives_are_finite_at_zero() -> None:
    g = torch.tensor([0.0, 1e-30, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    out = log_sign(g).sum()
    (grad,) = torch.autograd.grad(out, g, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), g, allow_unused=True, materialize_grads=True)
    assert torch.isfinite(grad).all() and torch.isfinite(second).all()


def test_log_sign_rejects_bad_scale() -> None:
    with pytest.raises(ValueError, match="p"):
        log_sign(torch.ones(2), 0.0)
