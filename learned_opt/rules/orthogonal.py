"""Muon's orthogonalized direction for matrix-shaped parameters (Jordan et al., 2024).

A weight matrix's momentum ``M`` is replaced by the nearest semi-orthogonal matrix
``U V^T`` (``M = U S V^T``), approximately, by a quintic Newton-Schulz iteration: every direction
of the matrix's input and output spaces moves by the same amount, instead of the few dominant
ones. :func:`orthogonal_direction` scales it so that its root mean square is about Adam's (0.2;
Liu et al., 2025, "Muon is scalable for LLM training"), so that a rule's step sizes carry over.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["matrix_direction", "orthogonal_direction", "orthogonalize"]

#: Coefficients of the quintic Newton-Schulz iteration (Jordan et al., 2024).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: Tensor, steps: int = 5) -> Tensor:
    """The nearest semi-orthogonal matrix to ``g`` (2-D), approximately: after 5 steps its
    singular values lie in about [0.7, 1.2] (computed in ``g``'s dtype)."""
    if g.dim() != 2:
        raise ValueError(f"orthogonalize needs a matrix, not a tensor of shape {tuple(g.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = g / (g.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * (m @ m)) @ x
    return x.T if tall else x


def orthogonal_direction(flat: Tensor, rows: int, cols: int, steps: int = 5) -> Tensor:
    """``flat`` (``rows * cols`` coordinates, a tensor of shape ``(rows, ...)`` flattened)
    orthogonalized as a ``rows x cols`` matrix and scaled by ``0.2 sqrt(max(rows, cols))``
    (root mean square about 0.2, as an Adam step's), flat again."""
    scale = 0.2 * math.sqrt(max(rows, cols))
    return orthogonalize(flat.view(rows, cols), steps).reshape(-1) * scale


def matrix_direction(
    m: Tensor, grad: Tensor, beta1: float, rows: int, cols: int, adam: Tensor | None = None
) -> Tensor:
    """Muon's descent direction of a ``rows x cols`` matrix, flat: minus the Nesterov momentum
    ``beta1 m + (1 - beta1) grad`` (``m`` the momentum after this step's gradient ``grad``)
    orthogonalized by :func:`orthogonal_direction`; with ``adam`` (the tensor's Adam direction),
    scaled to its root mean square instead of 0.2."""
    direction = -orthogonal_direction(torch.lerp(m, grad, 1 - beta1), rows, cols)
    if adam is not None:
        direction = direction * (adam.pow(2).mean().sqrt() / 0.2)
    return direction
