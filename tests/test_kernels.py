"""The fused CPU LSTM-cell kernels agree with the pure-PyTorch path."""

from __future__ import annotations

import pytest
import torch

from learned_opt import LSTMRule, kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="fused kernels unavailable")


def _reference(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    i, f, g, o = gates.split(gates.shape[1] // 4, dim=1)
    c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c2), c2


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
def test_fused_cell_forward_backward_match_reference(dtype: torch.dtype, tol: float) -> None:
    torch.manual_seed(0)
    gates = (torch.randn(300, 80, dtype=dtype) * 4).requires_grad_(True)
    c = torch.randn(300, 20, dtype=dtype, requires_grad=True)
    h1, c1 = _reference(gates, c)
    h2, c2 = kernels.fused_cell(gates, c)
    torch.testing.assert_close(h2, h1, atol=tol, rtol=0)
    torch.testing.assert_close(c2, c1, atol=tol, rtol=0)
    dh, dc = torch.randn_like(h1), torch.randn_like(c1)
    g1 = torch.autograd.grad((h1 * dh).sum() + (c1 * dc).sum(), (gates, c))
    g2 = torch.autograd.grad((h2 * dh).sum() + (c2 * dc).sum(), (gates, c))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, atol=tol * 10, rtol=0)


def test_fused_cell_gradcheck() -> None:
    gates = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(kernels.fused_cell, (gates, c))


def test_in_place_cell_matches() -> None:
    gates, c = torch.randn(50, 80) * 3, torch.randn(50, 20)
    h_ref, c_ref = _reference(gates, c)
    h = torch.empty_like(c)
    assert kernels.fused_cell_(gates, c, h)
    torch.testing.assert_close(h, h_ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(c, c_ref, atol=2e-6, rtol=0)


def test_rule_with_and_without_kernels(monkeypatch: pytest.MonkeyPatch, rule: LSTMRule) -> None:
    grad = torch.randn(500) * 10.0 ** torch.randint(-8, 3, (500,))
    state = rule.init_state(500, like=grad)
    fast, _ = rule(grad, state)
    fast_inplace = rule.step_(grad, rule.init_state(500, like=grad))
    monkeypatch.setattr(kernels, "_EXT", None)  # the pure-PyTorch fallback
    slow, _ = rule(grad, state)
    slow_inplace = rule.step_(grad, rule.init_state(500, like=grad))
    for other in (fast_inplace, slow, slow_inplace):
        torch.testing.assert_close(other, fast, atol=1e-6, rtol=1e-5)
