"""The in-place step of the LSTM-corrected Adam rule on GPU tensors: three Triton kernels.

The counterpart of ``corrected_adam.cpp`` for CUDA. Per tensor: the partial sums of the gradient
clipping and of the step-size adaptation, per block of coordinates (:func:`per_tensor_`); one
program that adds them up and does the per-tensor arithmetic of
:mod:`learned_opt.rules.per_tensor` (the clipping factor, the new log step size and its
statistics); then, per block of coordinates, the moments, the LSTM's inputs, its layer (gate
products, cell), the read-out and the update (:func:`step_`), with the state (float32 or
bfloat16) read once and written once; no per-coordinate temporaries reach memory. Everything
stays on the device: the step makes no host synchronization. The arithmetic is the forward's up
to rounding (GPU transcendentals, the sums' and gate products' summation order): results agree
with the CPU step to float32 tolerance, not bit for bit. (A rule with a learned controller of
the adaptation does the per-tensor part with PyTorch operations on the device instead; a
matrix's orthogonalized direction, ``orthogonal``, is computed by PyTorch on the device before
the main pass, which reads it in place of Adam's, as the CPU kernel does.)

Used by :func:`learned_opt.rules.corrected_adam_step.step_` for CUDA tensors when Triton is
installed (it ships with PyTorch's CUDA builds) and ``LEARNED_OPT_NO_TRITON`` is unset; a rule of
more than one LSTM layer, or a hidden size that is not a power of two, takes the forward.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
from torch import Tensor

__all__ = ["BLOCK", "SUM_BLOCK", "available", "per_tensor_", "step_", "supported"]

try:  # optional: absent from CPU-only installs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


#: Why the kernel failed to compile or launch, once it has (then it is not tried again).
_FAILED: str | None = None


def available() -> bool:
    """Whether the Triton step can run (Triton importable, not disabled, not failed)."""
    return triton is not None and _FAILED is None and not os.environ.get("LEARNED_OPT_NO_TRITON")


def _on_device(t: Tensor) -> bool:
    """Whether ``t`` is where the kernel runs: a CUDA tensor, or, under Triton's interpreter
    (``TRITON_INTERPRET=1``, which runs kernels on CPU tensors: how the tests check this one
    without a GPU), a CPU tensor."""
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _tanh(x):
        # tanh from the sigmoid (exact identity; Triton's core language has no tanh)
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _gate(h, x0, x1, x2, x3, x4, x5, x6, wih_ptr, whh_ptr, b_ptr, q: tl.constexpr,
              H: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
        # gate q's pre-activation (BLOCK, H): b + x W_ih + h W_hh (x: 7 inputs, by column)
        units = tl.arange(0, H)
        cols = q * H + units
        w_hh = tl.load(whh_ptr + units[:, None] * (4 * H) + cols[None, :])
        z = tl.dot(h, w_hh, input_precision=PREC) + tl.load(b_ptr + cols)[None, :]
        z += x0[:, None] * tl.load(wih_ptr + cols)[None, :]
        z += x1[:, None] * tl.load(wih_ptr + 4 * H + cols)[None, :]
        z += x2[:, None] * tl.load(wih_ptr + 8 * H + cols)[None, :]
        z += x3[:, None] * tl.load(wih_ptr + 12 * H + cols)[None, :]
        z += x4[:, None] * tl.load(wih_ptr + 16 * H + cols)[None, :]
        z += x5[:, None] * tl.load(wih_ptr + 20 * H + cols)[None, :]
        z += x6[:, None] * tl.load(wih_ptr + 24 * H + cols)[None, :]
        return z

    @triton.jit
    def _step_kernel(
        g_ptr, m0_ptr, m1_ptr, m2_ptr, m3_ptr, m4_ptr, v_ptr, vf_ptr, prev_ptr, h_ptr, c_ptr,
        wih_ptr, whh_ptr, b_ptr, ow_ptr, ob_ptr, log_lr_ptr, u_ptr, clip_ptr, exp_s_ptr, dir_ptr,
        n, G, b2, omb2, sq2, eps, bcf, floor_, p, abound, oscale,
        w0, w1, w2, w3, w4, bc0, bc1, bc2, bc3, bc4,
        ADAM_K: tl.constexpr, H: tl.constexpr, NOUT: tl.constexpr, HAS_PREV: tl.constexpr,
        HAS_DIR: tl.constexpr, BLOCK: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = rows < n
        gc = tl.load(g_ptr + rows, mask=mask, other=0.0)
        gc = tl.minimum(tl.maximum(gc, -G), G) * tl.load(clip_ptr)
        # the momenta: torch.lerp(m, g, w) (from the end for w >= 0.5, as ATen)
        m0 = tl.load(m0_ptr + rows, mask=mask, other=0.0).to(tl.float32)
        m1 = tl.load(m1_ptr + rows, mask=mask, other=0.0).to(tl.float32)
        m2 = tl.load(m2_ptr + rows, mask=mask, other=0.0).to(tl.float32)
        m3 = tl.load(m3_ptr + rows, mask=mask, other=0.0).to(tl.float32)
        m0 = gc + (w0 - 1.0) * (gc - m0)
        m1 = m1 + w1 * (gc - m1)
        m2 = m2 + w2 * (gc - m2)
        m3 = m3 + w3 * (gc - m3)
        tl.store(m0_ptr + rows, m0.to(m0_ptr.dtype.element_ty), mask=mask)
        tl.store(m1_ptr + rows, m1.to(m1_ptr.dtype.element_ty), mask=mask)
        tl.store(m2_ptr + rows, m2.to(m2_ptr.dtype.element_ty), mask=mask)
        tl.store(m3_ptr + rows, m3.to(m3_ptr.dtype.element_ty), mask=mask)
        if ADAM_K == 4:  # Adam's momentum, when it is none of the LSTM's (weight below 0.5)
            m4 = tl.load(m4_ptr + rows, mask=mask, other=0.0).to(tl.float32)
            m4 = m4 + w4 * (gc - m4)
            tl.store(m4_ptr + rows, m4.to(m4_ptr.dtype.element_ty), mask=mask)
        v = tl.load(v_ptr + rows, mask=mask, other=0.0).to(tl.float32) * b2 + (omb2 * gc) * gc
        tl.store(v_ptr + rows, v.to(v_ptr.dtype.element_ty), mask=mask)
        vf = tl.load(vf_ptr + rows, mask=mask, other=0.0).to(tl.float32) * 0.9 + (0.1 * gc) * gc
        tl.store(vf_ptr + rows, vf.to(vf_ptr.dtype.element_ty), mask=mask)
        # the LSTM's inputs and Adam's direction
        den = tl.sqrt_rn(v) / sq2 + eps
        x0 = gc / den
        x1 = (m0 / bc0) / den
        x2 = (m1 / bc1) / den
        x3 = (m2 / bc2) / den
        x4 = (m3 / bc3) / den
        x5 = tl.log(tl.maximum(tl.abs(gc) / den, floor_)) / p
        x6 = tl.log(tl.maximum((tl.sqrt_rn(vf / bcf) + eps) / den, floor_)) / p
        if HAS_DIR:  # a direction given by the caller (a matrix's, orthogonalized)
            dir = tl.load(dir_ptr + rows, mask=mask, other=0.0)
        elif ADAM_K == 0:
            dir = -x1
        elif ADAM_K == 1:
            dir = -x2
        elif ADAM_K == 2:
            dir = -x3
        elif ADAM_K == 3:
            dir = -x4
        else:
            dir = -((m4 / bc4) / den)
        # the layer: gates [i, f, g, o] = b + x W_ih + h W_hh, each (BLOCK, H)
        units = tl.arange(0, H)
        hc = rows[:, None] * H + units[None, :]
        hmask = mask[:, None]
        h = tl.load(h_ptr + hc, mask=hmask, other=0.0).to(tl.float32)
        c = tl.load(c_ptr + hc, mask=hmask, other=0.0).to(tl.float32)
        zi = _gate(h, x0, x1, x2, x3, x4, x5, x6, wih_ptr, whh_ptr, b_ptr, 0, H, PREC)
        zf = _gate(h, x0, x1, x2, x3, x4, x5, x6, wih_ptr, whh_ptr, b_ptr, 1, H, PREC)
        zg = _gate(h, x0, x1, x2, x3, x4, x5, x6, wih_ptr, whh_ptr, b_ptr, 2, H, PREC)
        zo = _gate(h, x0, x1, x2, x3, x4, x5, x6, wih_ptr, whh_ptr, b_ptr, 3, H, PREC)
        c = tl.sigmoid(zf) * c + tl.sigmoid(zi) * _tanh(zg)
        h = tl.sigmoid(zo) * _tanh(c)
        tl.store(h_ptr + hc, h.to(h_ptr.dtype.element_ty), mask=hmask)
        tl.store(c_ptr + hc, c.to(c_ptr.dtype.element_ty), mask=hmask)
        # the read-out and the update
        out0 = tl.sum(h * tl.load(ow_ptr + units * NOUT)[None, :], axis=1) + tl.load(ob_ptr)
        a = abound * _tanh(out0 * oscale / abound)
        u = dir * tl.exp(a)
        if HAS_PREV:
            tl.store(prev_ptr + rows, u.to(prev_ptr.dtype.element_ty), mask=mask)
            u = u * tl.load(exp_s_ptr)
        if NOUT == 2:
            out1 = tl.sum(h * tl.load(ow_ptr + units * NOUT + 1)[None, :], axis=1)
            u = u + (out1 + tl.load(ob_ptr + 1)) * oscale
        tl.store(u_ptr + rows, tl.exp(tl.load(log_lr_ptr)) * u, mask=mask)

    @triton.jit
    def _sums_kernel(g_ptr, v_ptr, prev_ptr, part_ptr, n, G, HAS_PREV: tl.constexpr,
                     SBLOCK: tl.constexpr):  # fmt: skip
        # one block's partial sums: v, g^2 (g clamped to [-G, G]), g . prev, prev^2
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * SBLOCK + tl.arange(0, SBLOCK)
        mask = rows < n
        g = tl.load(g_ptr + rows, mask=mask, other=0.0)
        g = tl.minimum(tl.maximum(g, -G), G)
        v = tl.load(v_ptr + rows, mask=mask, other=0.0).to(tl.float32)
        tl.store(part_ptr + pid * 4, tl.sum(v, axis=0))
        tl.store(part_ptr + pid * 4 + 1, tl.sum(g * g, axis=0))
        if HAS_PREV:
            prev = tl.load(prev_ptr + rows, mask=mask, other=0.0).to(tl.float32)
            tl.store(part_ptr + pid * 4 + 2, tl.sum(g * prev, axis=0))
            tl.store(part_ptr + pid * 4 + 3, tl.sum(prev * prev, axis=0))

    @triton.jit
    def _per_tensor_kernel(
        part_ptr, nparts, log_step_ptr, fast_ptr, peak_ptr, out_ptr, new_log_step_ptr,
        new_fast_ptr, new_peak_ptr, do_clip, ref_div, clip_limit, rate, shrink1, margin,
        fast_bc, slowdown, slow_rate, bound,
        ADAPT: tl.constexpr, SLOW: tl.constexpr, PBLOCK: tl.constexpr,
    ):  # fmt: skip
        # the per-tensor arithmetic of per_tensor.clip_scale and adapt_from_sums (without a
        # controller), one program: writes [clip, exp(log_step)] and the new per-tensor state
        acc_v = tl.zeros([PBLOCK], tl.float32)
        acc_g2 = tl.zeros([PBLOCK], tl.float32)
        acc_gp = tl.zeros([PBLOCK], tl.float32)
        acc_p2 = tl.zeros([PBLOCK], tl.float32)
        start = 0
        while start < nparts:  # (a while loop: Triton's interpreter cannot range() to it)
            idx = start + tl.arange(0, PBLOCK)
            m = idx < nparts
            acc_v += tl.load(part_ptr + idx * 4, mask=m, other=0.0)
            acc_g2 += tl.load(part_ptr + idx * 4 + 1, mask=m, other=0.0)
            if ADAPT:
                acc_gp += tl.load(part_ptr + idx * 4 + 2, mask=m, other=0.0)
                acc_p2 += tl.load(part_ptr + idx * 4 + 3, mask=m, other=0.0)
            start += PBLOCK
        g2 = tl.sum(acc_g2, axis=0)
        ref = tl.sum(acc_v, axis=0) / ref_div
        factor = tl.minimum(tl.sqrt_rn(clip_limit * ref / tl.maximum(g2, 1e-30)), 1.0)
        clip = tl.where((ref > 0) & (do_clip != 0), factor, 1.0)
        tl.store(out_ptr, clip)
        if ADAPT:
            dot = -(tl.sum(acc_gp, axis=0) * clip)
            g2 = g2 * (clip * clip)
            p2 = tl.sum(acc_p2, axis=0)
            norms = g2 * p2
            norms = tl.where(norms == float("inf"), tl.sqrt_rn(g2) * tl.sqrt_rn(p2),
                             tl.sqrt_rn(norms))  # fmt: skip
            cos = dot / tl.maximum(norms, 1e-30)
            cos = cos + shrink1 * tl.minimum(cos + margin, 0.0)
            if SLOW:
                fast = tl.load(fast_ptr) * 0.9 + 0.1 * g2
                norm = tl.sqrt_rn(fast / fast_bc)
                peak = tl.maximum(tl.load(peak_ptr), norm)
                tl.store(new_fast_ptr, fast)
                tl.store(new_peak_ptr, peak)
                cos = tl.where((cos > 0) & (norm * slowdown < peak), cos * slow_rate, cos)
            log_step = tl.minimum(tl.maximum(tl.load(log_step_ptr) + rate * cos, -bound), bound)
            tl.store(new_log_step_ptr, log_step)
            tl.store(out_ptr + 1, tl.exp(log_step))


#: Coordinates per Triton program (of the step; of the per-tensor sums), and the step's warps
#: per program (``python benchmarks/gpu_step_time.py --sweep`` times the alternatives).
BLOCK = 128
NUM_WARPS = 4
SUM_BLOCK = 4096
#: Precision of the gate products (``tl.dot``'s ``input_precision``): "ieee", float32 arithmetic.
#: (Triton's "tf32x3", on tensor cores, is 24% faster at 100M parameters on an H200, but its steps
#: then differ from the CPU's by up to 8% of the parameters' change: the GPU tests fail.)
DOT_PRECISION = "ieee"


def supported(rule: Any, grad: Tensor, state: dict[str, Any]) -> bool:
    """Whether :func:`step_` handles this rule, gradient and state (else: the forward)."""
    cfg = rule.settings
    hidden = cfg.hidden_size
    if not (
        available()
        and _on_device(grad)
        and grad.dtype == torch.float32
        and grad.dim() == 1
        and grad.is_contiguous()
        and cfg.lstm
        and cfg.scale_invariant
        and cfg.nominal
        and cfg.num_layers == 1
        and hidden >= 16
        and hidden & (hidden - 1) == 0
        and rule.in_size == 7
        and "tensor" not in state
        and ("matrix" not in state or cfg.orthogonal)
        and not rule.settings.orthogonal_mix
        and not rule.settings.direction_correction
    ):
        return False
    from . import momenta_ok, state_layout_ok

    if not momenta_ok(rule):
        return False
    coord = [k for k in state if rule.coord_dim(k) is not None]
    return state_layout_ok(rule, state, coord) and all(
        state[k].device == grad.device and state[k].is_contiguous() for k in coord
    )


def per_tensor_(
    rule: Any, grad: Tensor, state: dict[str, Any], t: float, bound: float, clip_limit: float,
    rate: float,
) -> tuple[Tensor, Tensor | None, dict[str, Tensor]] | None:  # fmt: skip
    """The per-tensor part of the step at step ``t`` for a rule without a controller, in two
    launches: the sums, then the arithmetic of :func:`~learned_opt.rules.per_tensor.clip_scale`
    and :func:`~learned_opt.rules.per_tensor.adapt_from_sums` (``clip_limit`` and ``rate``: the
    clipping's threshold factor and the adaptation's rate at step ``t``, warm-ups included).
    Returns the gradient clipping's factor and the adapted step size (one-element device
    tensors; ``None`` without adaptation) and the new per-tensor state, with ``state``
    unchanged; ``None`` (after a warning, once) if the kernels cannot be compiled or launched
    here."""
    cfg = rule.settings
    adapt, slow = cfg.lr_adapt > 0, cfg.lr_adapt > 0 and cfg.lr_adapt_slowdown > 0
    n = grad.numel()
    nparts = triton.cdiv(n, SUM_BLOCK)
    parts, out = grad.new_empty(nparts, 4), grad.new_empty(2)
    new = {key: grad.new_empty(1) for key in ("log_step", "grad_fast", "grad_peak")
           if adapt and (key == "log_step" or slow)}  # fmt: skip
    prev = state["prev"] if adapt else grad
    do_clip = cfg.grad_clip > 0 and t > 1
    try:
        _sums_kernel[(nparts,)](
            grad, state["v"], prev, parts, n, bound, HAS_PREV=adapt, SBLOCK=SUM_BLOCK
        )
        _per_tensor_kernel[(1,)](
            parts, nparts, state.get("log_step", out), state.get("grad_fast", out),
            state.get("grad_peak", out), out, new.get("log_step", out),
            new.get("grad_fast", out), new.get("grad_peak", out),
            int(do_clip), 1 - cfg.beta2 ** (t - 1) if do_clip else 1.0,
            clip_limit, rate,
            cfg.lr_adapt_shrink - 1.0, cfg.lr_adapt_margin, 1 - 0.9**t,
            cfg.lr_adapt_slowdown, cfg.lr_adapt_slowdown_rate, cfg.lr_adapt_bound,
            ADAPT=adapt, SLOW=slow, PBLOCK=256,
        )  # fmt: skip
    except Exception as exc:  # e.g. a GPU or Triton version the kernels do not compile for
        _fail(exc)
        return None
    return out[:1], (out[1:] if adapt else None), new


def step_(rule: Any, grad: Tensor, state: dict[str, Any], t: float, bound: float, clip: Tensor,
          exp_s: Tensor | None, direction: Tensor | None = None) -> Tensor | None:  # fmt: skip
    """The main pass of the step at step ``t`` (``grad`` read clamped to ``[-bound, bound]``;
    the gradient clipping's factor ``clip`` and the adapted step size ``exp_s`` as one-element
    device tensors; ``direction``, float32 of ``grad``'s size, in place of Adam's: a matrix's
    orthogonalized one): the state updated in place; returns the update. If the kernel cannot
    be compiled or launched here, warns once and returns ``None`` with the state unchanged (the
    caller then takes the forward)."""
    update = torch.empty_like(grad)
    try:
        _launch(rule, grad, state, t, bound, clip, exp_s, update, direction)
    except Exception as exc:  # e.g. a GPU or Triton version the kernel does not compile for
        _fail(exc)
        return None
    return update


def _fail(exc: Exception) -> None:
    """Record why a kernel failed (none is tried again) and warn."""
    global _FAILED
    _FAILED = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        f"learned_opt: the Triton step of the LSTM-corrected Adam rule is unavailable "
        f"({_FAILED}); using its PyTorch forward (same math, slower)",
        RuntimeWarning,
        stacklevel=5,
    )


def _launch(rule: Any, grad: Tensor, state: dict[str, Any], t: float, bound: float, clip: Tensor,
            exp_s: Tensor | None, update: Tensor, direction: Tensor | None) -> None:  # fmt: skip
    cfg = rule.settings
    betas = rule._state_betas
    n = grad.numel()
    w_ih, w_hh, bias = (ts[0] for ts in rule.layer_weights())
    prev = state.get("prev")
    scalars = [
        cfg.beta2, 1 - cfg.beta2, (1 - cfg.beta2**t) ** 0.5, cfg.eps, 1 - 0.9**t,
        math.exp(-rule.preprocess_p), rule.preprocess_p, cfg.a_bound, rule.output_scale,
    ]  # fmt: skip
    _step_kernel[(triton.cdiv(n, BLOCK),)](
        grad, *(state[f"m{k}"] for k in range(4)), state.get("m4", grad), state["v"],
        state["v_fast"],
        prev if prev is not None else grad, state["h0"], state["c0"],
        w_ih.contiguous(), w_hh.contiguous(), bias.contiguous(),
        rule.out_weight.contiguous(), rule.out_bias.contiguous(), rule.log_lr.reshape(1), update,
        clip, exp_s if exp_s is not None else clip, direction if direction is not None else grad,
        n, bound, *scalars,
        *(1 - b for b in betas[:4]), 1 - betas[-1], *(1 - b**t for b in betas[:4]),
        1 - betas[-1] ** t,
        ADAM_K=betas.index(cfg.beta1), H=cfg.hidden_size, NOUT=rule.out_weight.shape[1],
        HAS_PREV=prev is not None, HAS_DIR=direction is not None, BLOCK=BLOCK,
        PREC=DOT_PRECISION, num_warps=NUM_WARPS,
    )  # fmt: skip
