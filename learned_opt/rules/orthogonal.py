"""Muon's orthogonalized direction for matrix-shaped parameters (Jordan et al., 2024).

A weight matrix's momentum ``M`` is replaced by the nearest semi-orthogonal matrix
``U V^T`` (``M = U S V^T``), approximately, by a quintic Newton-Schulz iteration: every direction
of the matrix's input and output spaces moves by the same amount, instead of the few dominant
ones. :func:`orthogonal_direction` scales it so that its root mean square is about Adam's (0.2;
Liu et al., 2025, "Muon is scalable for LLM training"), so that a rule's step sizes carry over.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "matrix_direction",
    "matrix_layout",
    "matrices_direction",
    "orthogonal_direction",
    "orthogonalize",
]

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


def matrix_layout(shapes: Sequence[Sequence[int]]) -> Tensor:
    """Where the matrices are in a flat vector that concatenates tensors of ``shapes``: an int
    tensor (k, 3) of each matrix's (first coordinate, rows, columns), for the tensors of 2 or more
    dimensions (``shape[0]`` rows) and at least one coordinate."""
    rows: list[list[int]] = []
    start = 0
    for shape in shapes:
        n = math.prod(shape)
        if len(shape) >= 2 and n > 0:
            rows.append([start, shape[0], n // shape[0]])
        start += n
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)


def matrices_direction(
    m: Tensor, grad: Tensor, adam: Tensor, beta1: float, layout: Tensor, rms: bool
) -> Tensor:
    """The flat direction of a vector of several tensors: :func:`matrix_direction` on each
    matrix of ``layout`` (:func:`matrix_layout`), Adam's (``adam``) elsewhere; with ``rms``,
    each matrix's scaled to the root mean square of its Adam direction (differentiable)."""
    pieces: list[Tensor] = []
    pos = 0
    for start, rows, cols in layout.tolist():
        end = start + rows * cols
        pieces.append(adam[pos:start])
        a = adam[start:end]
        pieces.append(
            matrix_direction(m[start:end], grad[start:end], beta1, rows, cols, a if rms else None)
        )
        pos = end
    pieces.append(adam[pos:])
    return torch.cat(pieces)
