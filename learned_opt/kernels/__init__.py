"""Optional fused CPU kernels, compiled on first use (``torch.utils.cpp_extension``).

The LSTM cell's elementwise work (four gate nonlinearities, the cell update, the hidden output and
their derivatives) runs as one pass per row instead of ~15 separate PyTorch kernels; the whole
in-place inference step of the LSTM optimizer (preprocessing, gate products, cells, read-out) runs
as one call (:func:`fused_step_`); and for meta-training, the rule's whole step is one
differentiable call (:func:`fused_rule`) whose backward is one fused call too (the cells' backward
and the gate products' backward per cache-sized block of coordinates). A second extension,
``corrected_adam.cpp`` (compiled without ``-ffast-math``, so that its float operations are
PyTorch's one for one), is the in-place step of the LSTM-corrected Adam rule
(:mod:`learned_opt.rules.corrected_adam_step`); its AVX-512 LSTM layers give, bit for bit, the
results of ``lstm_cell.cpp``'s. If the compiler or ``ninja`` is missing, or
``LEARNED_OPT_NO_EXT=1`` is set, everything falls back to the pure-PyTorch implementation (same
math) with one warning. Build products are cached by PyTorch in
``~/.cache/torch_extensions`` (or ``TORCH_EXTENSIONS_DIR``), under a name that includes a
fingerprint of this CPU: the code is compiled with ``-march=native``, so a cache shared with
another kind of machine is not reused.

On CUDA GPUs, :mod:`learned_opt.kernels.corrected_adam_triton` is that rule's step as one Triton
kernel (imported only when a GPU tensor is stepped).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "available",
    "fused_cell",
    "fused_cell_",
    "fused_lstm",
    "fused_rule",
    "fused_step_",
    "state_layout_ok",
]

_EXT: Any = None
_DTYPES = (torch.float32, torch.float64)  # the kernels' types; others take the PyTorch path
_TRIED = False
_CFLAGS = ["-O3", "-ffast-math", "-march=native"]
# corrected_adam.cpp repeats PyTorch's float arithmetic exactly: no fast-math, no fma contraction.
_EXACT_CFLAGS = ["-O3", "-march=native", "-fno-fast-math", "-ffp-contract=off"]
if platform.machine() in ("x86_64", "AMD64"):  # full-width vectors where there is AVX-512
    _EXACT_CFLAGS += ["-mprefer-vector-width=512"]
_CA_EXT: Any = None
_CA_TRIED = False
# at::parallel_for is a header template: without OpenMP in the extension's own compile it runs
# serially. Linked with -fopenmp, the extension resolves to the libgomp that torch already loaded
# (same soname), so it shares torch's thread pool and follows torch.set_num_threads.
_OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []


def _cpu_fingerprint() -> str:
    """A short hash of what ``-march=native`` depends on: the CPU model and its feature flags
    (``/proc/cpuinfo`` on Linux; elsewhere the platform's processor description)."""
    desc = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("vendor_id", "model name", "flags", "Features", "CPU part"):
                    desc.append(line.strip())
                elif not line.strip() and len(desc) > 2:
                    break  # the first processor describes them all
    except OSError:
        pass
    return hashlib.sha256("\n".join(desc).encode()).hexdigest()[:10]


def _install_fingerprint() -> str:
    """A short hash of this install: its sources (folder and text), the torch it builds against
    and the Python environment. Two installs on one machine (a checkout and a pip-installed
    copy, two virtual environments) then keep builds of their own: sharing one, each rebuilt it
    on every first use after the other, and a torch upgraded in place could load a build for
    the old; an upgraded install builds anew (and says so)."""
    folder = Path(__file__).resolve().parent
    desc = [str(folder), torch.__version__, str(Path(torch.__file__)), sys.prefix]
    digest = hashlib.sha256("\n".join(desc).encode())
    for source in sorted(folder.glob("*.cpp")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:10]


def _build_directory(name: str) -> Path:
    """The cache folder of the extension ``name`` (created if missing): one per CPU and
    install."""
    from torch.utils.cpp_extension import _get_build_directory

    key = f"{name}_{_cpu_fingerprint()}_{_install_fingerprint()}"
    return Path(_get_build_directory(key, verbose=False))


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """The ``ninja`` of the ``ninja`` package (a dependency) first on ``PATH`` while building:
    PyTorch runs ``ninja`` from ``PATH``, which holds the environment's ``bin`` only when the
    environment is activated."""
    try:
        import ninja

        first = str(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        yield
        return
    before = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join(x for x in (first, before) if x)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` across processes.

    Every PyTorch load, even of an up-to-date build, creates and removes the lock file
    ``folder/lock``; a process killed in between leaves it, and later loads wait on it forever.
    An ``flock`` is released when its file is closed or its holder dies: under it, a lock file
    is a dead process's leftover. Without ``fcntl`` (Windows), one older than any build is."""
    torch_lock = folder / "lock"
    try:
        import fcntl
    except ImportError:
        if torch_lock.exists() and time.time() - torch_lock.stat().st_mtime > 600:
            torch_lock.unlink(missing_ok=True)
        yield
        return
    with open(folder / "learned_opt.lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        torch_lock.unlink(missing_ok=True)
        yield


def _build(name: str, source: str, cflags: list[str]) -> Any:
    """Compile (or load from the cache) the extension ``name`` from ``source`` in this folder."""
    from torch.utils.cpp_extension import load

    folder = _build_directory(name)
    with _exclusive(folder), _ninja_on_path():
        if not any(folder.glob(f"{folder.name}*.so")) and not any(folder.glob("*.pyd")):
            print(
                f"learned_opt: compiling its fused CPU kernels for this machine ({source}; "
                f"about a minute, once: cached in {folder}; LEARNED_OPT_NO_EXT=1 skips them)",
                file=sys.stderr,
                flush=True,
            )
        return load(
            name=folder.name,
            sources=[str(Path(__file__).with_name(source))],
            extra_cflags=cflags + _OPENMP,
            extra_ldflags=_OPENMP,
            verbose=False,
        )


def _load() -> Any:
    global _EXT, _TRIED
    if _TRIED:
        return _EXT
    _TRIED = True
    if os.environ.get("LEARNED_OPT_NO_EXT"):
        return None
    try:
        _EXT = _build("learned_opt_lstm_cell", "lstm_cell.cpp", _CFLAGS)
    except Exception as exc:  # no compiler, no ninja, unsupported platform
        warnings.warn(
            f"learned_opt: fused CPU kernels unavailable ({type(exc).__name__}: {exc}); "
            "using the pure-PyTorch implementation (same results, slower)",
            RuntimeWarning,
            stacklevel=3,
        )
        _EXT = None
    return _EXT


def _load_corrected_adam() -> Any:
    """The extension of the LSTM-corrected Adam rule's fused step (``corrected_adam.cpp``,
    compiled without ``-ffast-math``: its arithmetic is PyTorch's, operation for operation), or
    ``None`` (then the rule's step runs its PyTorch forward, the same results)."""
    global _CA_EXT, _CA_TRIED
    if _CA_TRIED:
        return _CA_EXT
    _CA_TRIED = True
    if _load() is None:
        return None
    try:
        _CA_EXT = _build("learned_opt_corrected_adam", "corrected_adam.cpp", _EXACT_CFLAGS)
    except Exception as exc:
        warnings.warn(
            f"learned_opt: the fused step of the LSTM-corrected Adam rule is unavailable "
            f"({type(exc).__name__}: {exc}); using its PyTorch forward (same results, slower)",
            RuntimeWarning,
            stacklevel=3,
        )
        _CA_EXT = None
    return _CA_EXT


def momenta_ok(rule: Any) -> bool:
    """Whether the fused steps (CPU and Triton) take the LSTM-corrected Adam rule's momenta: the
    LSTM's four, Adam's ``beta1`` among them or a fifth whose weight ``1 - beta1`` is below 0.5
    and which is no slow average (not among ``rule.precise_keys()``: stored like the others)."""
    betas, lstm = rule._state_betas, tuple(rule.momentum_betas)
    if len(lstm) != 4 or betas[:4] != lstm:
        return False
    return len(betas) == 4 or (
        len(betas) == 5 and 1 - betas[4] < 0.5 and "m4" not in rule.precise_keys()
    )


def state_layout_ok(rule: Any, state: dict[str, Any], coord: list[str]) -> bool:
    """Whether the LSTM-corrected Adam rule's per-coordinate entries ``coord`` of ``state``
    have a storage the fused steps (CPU and Triton) take: all float32 or all bfloat16, except
    that the slow averages (``rule.precise_keys()``) may be float32 beside bfloat16."""
    precise = rule.precise_keys()
    dtypes = {state[k].dtype for k in coord if k not in precise}
    if len(dtypes) != 1 or (dtype := dtypes.pop()) not in (torch.float32, torch.bfloat16):
        return False
    return all(state[k].dtype in (dtype, torch.float32) for k in coord if k in precise)


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


#: Rows per block of :func:`fused_step_` (the per-thread working set, ~``block * 16H`` floats
#: with the states, stays in L1/L2).
FUSED_BLOCK = 128


def _states_ok(h: list[Tensor], c: list[Tensor], n: int, hidden: int, dtypes: tuple) -> bool:
    if not h or len(h) != len(c):
        return False
    sdt = h[0].dtype
    return sdt in dtypes and all(
        s.dtype == sdt and s.device.type == "cpu" and s.is_contiguous() and s.shape == (n, hidden)
        for s in (*h, *c)
    )


def _inputs_ok(x: Tensor, dim: int) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == dim
        and x.is_contiguous()
        and not x.requires_grad
    )


def fused_step_(
    grad: Tensor,
    h: list[Tensor],
    c: list[Tensor],
    w_ih: list[Tensor],
    w_hh: list[Tensor],
    bias: list[Tensor],
    out_weight: Tensor,
    out_bias: Tensor,
    *,
    preprocess_p: float | None,
    output_scale: float,
    block: int | None = None,
) -> Tensor | None:
    """The whole in-place inference step of a coordinatewise LSTM (:meth:`LSTMRule.step_`) in one
    call: log/sign preprocessing (``preprocess_p``; ``None`` for the raw gradient), per layer
    ``gates = [x, h] @ [w_ih; w_hh] + bias`` and the cell update of ``h[l]``, ``c[l]`` in place,
    and the read-out ``output_scale * (h[-1] @ out_weight + out_bias)``, which is returned.

    Coordinates are processed in blocks of ``block`` rows spread over the intra-op threads, with
    per-thread scratch; results do not depend on the blocking or the thread count. The states may
    be float32 or bfloat16 (upcast per block, computed in float32, rounded back to nearest).

    Returns ``None`` (doing nothing) when this case is not covered: kernels unavailable, not on
    CPU, ``grad`` not a contiguous float32 vector, states of another dtype or layout, a hidden
    size that is not a multiple of 4.
    """
    if (
        grad.device.type != "cpu"
        or grad.dtype != torch.float32
        or not grad.is_contiguous()
        or not h
        or w_hh[0].shape[0] % 4
        or not _states_ok(h, c, grad.numel(), w_hh[0].shape[0], (torch.float32, torch.bfloat16))
        or _load() is None
    ):
        return None
    return _EXT.step_(
        grad,
        h,
        c,
        w_ih,
        w_hh,
        bias,
        out_weight,
        out_bias,
        0.0 if preprocess_p is None else float(preprocess_p),
        float(output_scale),
        FUSED_BLOCK if block is None else int(block),
        False,
    )


#: Rows per partial sum of the weight gradients in the fused rule's backward (fixed, so that the
#: result does not depend on the thread count).
FUSED_CHUNK = 1024


class _FusedRule(torch.autograd.Function):
    """The coordinatewise LSTM's step, differentiable in its states and weights (not in the
    gradient or inputs it reads: first order). With ``inputs``, ``grad`` holds the network's
    inputs and there is no read-out (``out_w``, ``out_b`` empty)."""

    @staticmethod
    def forward(
        ctx: Any, grad: Tensor, inputs: bool, layers: int, p: float, scale: float, *tensors: Tensor
    ):
        hs, cs, w_ih, w_hh, bias = (list(tensors[i * layers : (i + 1) * layers]) for i in range(5))
        out_w, out_b = tensors[5 * layers :]
        res = _EXT.train_forward(
            grad, hs, cs, w_ih, w_hh, bias, out_w, out_b, p, scale, FUSED_BLOCK, inputs
        )
        update, hn, cn, acts = (
            res[0],
            res[1 : 1 + layers],
            res[1 + layers : 1 + 2 * layers],
            res[1 + 2 * layers :],
        )
        ctx.inputs, ctx.layers, ctx.p, ctx.scale = inputs, layers, p, scale
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad, *hs, *cs, *hn, *cn, *acts, *w_ih, *w_hh, *bias, out_w, out_b)
        return (*hn, *cn) if inputs else (update, *hn, *cn)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, *d_out: Tensor | None):
        layers = ctx.layers
        grad, *rest = ctx.saved_tensors
        hs, cs, hn, cn, acts, w_ih, w_hh, bias = (
            rest[i * layers : (i + 1) * layers] for i in range(8)
        )
        out_w, out_b = rest[8 * layers :]
        empty = grad.new_empty(0)
        if ctx.inputs:
            d_update, d_states = empty, d_out
        else:
            d_update, *d_states = d_out
            d_update = torch.zeros_like(grad) if d_update is None else d_update.contiguous()
        dh, dc = (
            [
                empty if d is None else d.contiguous()
                for d in d_states[i * layers : (i + 1) * layers]
            ]
            for i in range(2)
        )
        res = _EXT.train_backward(
            grad, hs, cs, hn, cn, acts, w_ih, w_hh, bias, out_w, out_b, d_update, dh, dc,
            ctx.p, ctx.scale, FUSED_BLOCK, FUSED_CHUNK, ctx.inputs,
        )  # fmt: skip
        if ctx.inputs:
            res = [*res[:-2], None, None]
        return (None, None, None, None, None, *res)


def _fused_out_of_place(
    x: Tensor,
    inputs: bool,
    h: list[Tensor],
    c: list[Tensor],
    w_ih: list[Tensor],
    w_hh: list[Tensor],
    bias: list[Tensor],
    readout: tuple[Tensor, ...],
    p: float,
    scale: float,
) -> tuple[Tensor | None, list[Tensor], list[Tensor]] | None:
    """The out-of-place step of :func:`fused_rule` (``inputs=False``: ``x`` is the gradient, with
    the read-out ``(out_weight, out_bias)``) or :func:`fused_lstm` (``inputs=True``: ``x`` holds
    the network's inputs, no read-out): ``(update or None, new h, new c)``, or ``None`` when not
    covered. Differentiable when a state or weight requires grad; otherwise the in-place kernel
    runs on copies of the states (no activations to save)."""
    tensors = (*h, *c, *w_ih, *w_hh, *bias, *readout)
    hidden = w_hh[0].shape[0] if w_hh else 0
    if (
        not _inputs_ok(x, 2 if inputs else 1)
        or not h
        or hidden % 4
        or not _states_ok(h, c, x.shape[0], hidden, (torch.float32,))
        or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors)
        or _load() is None
    ):
        return None
    layers = len(h)
    out_w, out_b = readout or (x.new_empty(0), x.new_empty(0))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        res = _FusedRule.apply(
            x, inputs, layers, p, scale, *h, *c, *w_ih, *w_hh, *bias, out_w, out_b
        )
        update, states = (None, res) if inputs else (res[0], res[1:])
    else:
        states = [s.clone() for s in (*h, *c)]
        update = _EXT.step_(x, states[:layers], states[layers:], w_ih, w_hh, bias, out_w, out_b,
                            p, scale, FUSED_BLOCK, inputs)  # fmt: skip
        update = None if inputs else update
    return update, list(states[:layers]), list(states[layers:])


def fused_rule(
    grad: Tensor,
    h: list[Tensor],
    c: list[Tensor],
    w_ih: list[Tensor],
    w_hh: list[Tensor],
    bias: list[Tensor],
    out_weight: Tensor,
    out_bias: Tensor,
    *,
    preprocess_p: float | None,
    output_scale: float,
) -> tuple[Tensor, list[Tensor], list[Tensor]] | None:
    """The coordinatewise LSTM's step out of place (:meth:`LSTMRule.forward`), differentiable in
    the states and weights with a fused backward (for meta-training): the same math as
    :func:`fused_step_`, returning ``(update, new h per layer, new c per layer)``; the old states
    are left as they are.

    Returns ``None`` when this case is not covered: kernels unavailable, not all float32
    contiguous CPU tensors, a hidden size that is not a multiple of 4, or a gradient that
    requires grad (second-order meta-gradients need the PyTorch path).
    """
    p = 0.0 if preprocess_p is None else float(preprocess_p)
    readout = (out_weight, out_bias)
    # with a read-out, the update is a tensor
    return _fused_out_of_place(grad, False, h, c, w_ih, w_hh, bias, readout, p, float(output_scale))  # type: ignore[return-value]


def fused_lstm(
    x: Tensor,
    h: list[Tensor],
    c: list[Tensor],
    w_ih: list[Tensor],
    w_hh: list[Tensor],
    bias: list[Tensor],
) -> tuple[list[Tensor], list[Tensor]] | None:
    """A stack of coordinatewise LSTM layers on given inputs ``x`` (n, in) (e.g. the features
    of :class:`~learned_opt.rules.LSTMCorrectedAdamRule`), out of place and differentiable in
    the states and weights (not in ``x``: first order), with the fused backward of
    :func:`fused_rule`: returns ``(new h per layer, new c per layer)``, or ``None`` when not
    covered (see :func:`fused_rule`; ``x`` must not require grad)."""
    res = _fused_out_of_place(x, True, h, c, w_ih, w_hh, bias, (), 0.0, 1.0)
    return None if res is None else (res[1], res[2])


class _NoCtx:
    def save_for_backward(self, *tensors: Tensor) -> None:
        pass
