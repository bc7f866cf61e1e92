"""Gradient preprocessing for coordinatewise learned optimizers."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["log_sign"]


def log_sign(grad: Tensor, p: float = 10.0) -> Tensor:
    r"""The log/sign preprocessing of Andrychowicz et al. (2016), Appendix A.

    .. math::

        \nabla \mapsto \begin{cases}
            (\log|\nabla| / p,\ \operatorname{sign} \nabla) & |\nabla| \ge e^{-p} \\
            (-1,\ e^{p} \nabla) & \text{otherwise}
        \end{cases}

    Gradients of any magnitude map to inputs of order one. The logarithm is taken of
    ``max(|g|, e^-p)`` so that neither branch of ``torch.where`` produces ``inf`` or ``NaN``,
    which keeps first and second derivatives finite (an unguarded ``log(0)`` in the unused
    branch would poison the backward pass with ``NaN``).

    Args:
        grad: gradients, any shape.
        p: the scale parameter (10 in the paper; the original TensorFlow code used 5).

    Returns:
        A tensor of shape ``grad.shape + (2,)``.
    """
    if p <= 0:
        raise ValueError(f"Invalid preprocessing scale p: {p} (must be > 0)")
    threshold = math.exp(-p)
    magnitude = grad.abs()
    large = magnitude >= threshold
    log_part = torch.log(magnitude.clamp_min(threshold)) / p
    first = torch.where(large, log_part, torch.full_like(grad, -1.0))
    second = torch.where(large, torch.sign(grad), grad * math.exp(p))
    return torch.stack((first, second), dim=-1)
