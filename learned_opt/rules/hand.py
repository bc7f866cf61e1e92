"""Hand-designed update rules behind the learned-rule interface (baselines and test doubles)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import RuleState, UpdateRule, bounded_grad, safe_sqrt, slow_average, step_count

__all__ = ["SGDRule", "AdamRule"]


class SGDRule(UpdateRule):
    r"""Gradient descent with optional heavy-ball momentum.

    .. math::
        m_t = \mu m_{t-1} + g_t, \qquad \Delta_t = -\eta\, m_t

    Args:
        lr: learning rate :math:`\eta`.
        momentum: momentum :math:`\mu` (0 disables the buffer).
    """

    kind = "sgd"

    def __init__(self, lr: float = 0.01, momentum: float = 0.0) -> None:
        super().__init__()
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        self.lr = lr
        self.momentum = momentum

    def init_state(self, numel: int, *, like: Tensor) -> RuleState:
        if self.momentum == 0:
            return {}
        return {"momentum_buffer": torch.zeros(numel, dtype=like.dtype, device=like.device)}

    def forward(self, grad: Tensor, state: RuleState) -> tuple[Tensor, RuleState]:
        if self.momentum == 0:
            return -self.lr * grad, {}
        buf = self.momentum * state["momentum_buffer"] + grad
        return -self.lr * buf, {"momentum_buffer": buf}

    def config(self) -> dict[str, Any]:
        return {"lr": self.lr, "momentum": self.momentum}


class AdamRule(UpdateRule):
    r"""Adam (Kingma & Ba, 2015), written to match ``torch.optim.Adam`` exactly.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
        \Delta_t = -\frac{\eta}{1-\beta_1^t}\,
            \frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    Args:
        lr: learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`.
        eps: :math:`\epsilon`.
    """

    kind = "adam"

    def __init__(
        self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        super().__init__()
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid beta parameters: {betas}")
        if eps < 0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        self.lr = lr
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = eps

    def init_state(self, numel: int, *, like: Tensor) -> RuleState:
        zeros = torch.zeros(numel, dtype=like.dtype, device=like.device)
        return {
            "step": torch.zeros((), dtype=torch.float32, device=like.device),
            "exp_avg": zeros,
            "exp_avg_sq": zeros.clone(),
        }

    def coord_dim(self, key: str) -> int | None:
        return None if key == "step" else 0

    def precise_keys(self) -> frozenset[str]:
        keys = zip(("exp_avg", "exp_avg_sq"), self.betas)
        return frozenset(k for k, beta in keys if slow_average(beta))

    def forward(self, grad: Tensor, state: RuleState) -> tuple[Tensor, RuleState]:
        beta1, beta2 = self.betas
        step = step_count(state, grad)
        grad = bounded_grad(grad)  # finite second moments for any finite gradient
        exp_avg = torch.lerp(state["exp_avg"], grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"] * beta2 + (1 - beta2) * grad * grad
        # Same operation order as torch.optim.adam._single_tensor_adam, for 1e-6 parity.
        t = float(step)
        bias_correction1 = 1 - beta1**t
        bias_correction2_sqrt = (1 - beta2**t) ** 0.5
        denom = safe_sqrt(exp_avg_sq) / bias_correction2_sqrt + self.eps
        update = -(self.lr / bias_correction1) * exp_avg / denom
        return update, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    def config(self) -> dict[str, Any]:
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps}
