"""Former import path of the inner loop, kept for code that imports it from here: the inner loop
is :mod:`learned_opt.outer.unroll` (public: ``learned_opt.unroll``, ``learned_opt.run_inner``)."""

from __future__ import annotations

from .outer.grad_checkpoint import (
    checkpoint_schedule,
    checkpoint_segments,
    schedule_cost,
    sqrt_segment,
)
from .outer.unroll import OBJECTIVES, UnrollSpec, Window, run_inner, unroll

__all__ = [
    "OBJECTIVES",
    "UnrollSpec",
    "Window",
    "checkpoint_schedule",
    "checkpoint_segments",
    "run_inner",
    "schedule_cost",
    "sqrt_segment",
    "unroll",
]
