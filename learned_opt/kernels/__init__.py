"""Optional fused CPU kernels, compiled on first use (``torch.utils.cpp_extension``).

The LSTM cell's elementwise work (four gate nonlinearities, the cell update, the hidden output and
their derivatives) runs as one pass per row instead of ~15 separate PyTorch kernels. If the
compiler or ``ninja`` is missing, or ``LEARNED_OPT_NO_EXT=1`` is set, everything falls back to
the pure-PyTorch implementation (same math) with one warning. Build products are cached by
PyTorch in ``~/.cache/torch_extensions`` (or ``TORCH_EXTENSIONS_DIR``).
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["fused_cell", "fused_cell_", "available"]

_EXT: Any = None
_DTYPES = (torch.float32, torch.float64)  # the kernels' types; others take the PyTorch path
_TRIED = False


def _load() -> Any:
    global _EXT, _TRIED
    if _TRIED:
        return _EXT
    _TRIED = True
    if os.environ.get("LEARNED_OPT_NO_EXT"):
        return None
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        # A process killed while compiling leaves its lock behind, and torch would wait on it
        # forever: a lock older than any plausible build is stale.
        lock = Path(_get_build_directory("learned_opt_lstm_cell", verbose=False)) / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > 600:
            lock.unlink(missing_ok=True)
        _EXT = load(
            name="learned_opt_lstm_cell",
            sources=[str(Path(__file__).with_name("lstm_cell.cpp"))],
            extra_cflags=["-O3", "-ffast-math", "-march=native"],
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, unsupported platform
        warnings.warn(
            f"learned_opt: fused CPU kernels unavailable ({type(exc).__name__}: {exc}); "
            "using the pure-PyTorch implementation (same results, slower)",
            RuntimeWarning,
            stacklevel=3,
        )
        _EXT = None
    return _EXT


def available() -> bool:
    """Whether the fused CPU kernels are compiled and loaded (compiles them on first call)."""
    return _load() is not None


class _FusedCell(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gates: Tensor, c_prev: Tensor) -> tuple[Tensor, Tensor]:
        gates, c_prev = gates.contiguous(), c_prev.contiguous()
        h, c, act, tc = _EXT.forward(gates, c_prev)
        ctx.save_for_backward(act, c_prev, tc)
        return h, c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, dh: Tensor | None, dc: Tensor | None) -> tuple[Tensor, Tensor]:
        act, c_prev, tc = ctx.saved_tensors
        dh = torch.zeros_like(tc) if dh is None else dh
        dc = torch.zeros_like(tc) if dc is None else dc
        dgates, dc_prev = _EXT.backward(dh, dc, act, c_prev, tc)
        return dgates, dc_prev


def fused_cell(gates: Tensor, c_prev: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(h, c)`` of an LSTM cell from gate pre-activations ``[i, f, g, o]``, differentiable
    once (not twice); ``None`` when the kernels are unavailable or the inputs are not on CPU."""
    if gates.device.type != "cpu" or gates.dtype not in _DTYPES or _load() is None:
        return None
    if torch.is_grad_enabled() and (gates.requires_grad or c_prev.requires_grad):
        return _FusedCell.apply(gates, c_prev)
    return _FusedCell.forward(_NoCtx(), gates, c_prev)


def fused_cell_(gates: Tensor, c: Tensor, h: Tensor) -> bool:
    """In-place inference cell: ``gates`` is overwritten, ``c`` and ``h`` get the new states.
    Returns ``False`` (doing nothing) when the kernels are unavailable."""
    if gates.device.type != "cpu" or gates.dtype not in _DTYPES or _load() is None:
        return False
    _EXT.forward_(gates, c, h)
    return True


class _NoCtx:
    def save_for_backward(self, *tensors: Tensor) -> None:
        pass
