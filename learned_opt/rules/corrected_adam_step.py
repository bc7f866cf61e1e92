"""The drop-in optimizer's in-place step of :class:`~learned_opt.rules.LSTMCorrectedAdamRule`.

On CPU with a float32 gradient (float32 or bfloat16 state) the step is three passes of a fused
kernel over the tensor's coordinates in cache-sized blocks (:mod:`learned_opt.kernels`,
``corrected_adam.cpp``): the sums of the gradient clipping, the sums of the step-size adaptation,
and the step itself (moments, features, the LSTM, read-out, update), with the state updated in
place. The per-tensor arithmetic between the passes is the forward's own code
(:mod:`learned_opt.rules.per_tensor`). The kernel repeats the forward's float operations one for
one, so the result is bit for bit the forward's on tensors of up to one block (16,384
coordinates); on larger ones PyTorch splits its sums and matrix products differently (a
last-bit difference). On a CUDA GPU with Triton (PyTorch's CUDA builds ship it) the step is the
same parts as three Triton kernels (:mod:`learned_opt.kernels.corrected_adam_triton`), without
waiting for the device. Elsewhere
(another dtype, no compiler or Triton) the step is the forward, with the new state written into
the old one.

Either way the update is finite for every finite gradient: the kernel reads the gradient through
the same bound as the forward (:func:`~learned_opt.rules.base.grad_bound`), and the step is a
bounded factor times Adam's normalized direction.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import kernels
from . import per_tensor
from .base import RuleState, bounded_grad, grad_bound, store_
from .orthogonal import matrices_direction, matrix_direction

if TYPE_CHECKING:
    from .corrected_adam import LSTMCorrectedAdamRule

__all__ = ["BLOCK", "chunked_step_", "step_"]

#: Coordinates per block of the fused step: large enough that the per-block ATen calls (the
#: transcendental functions, the read-out's product) cost little beside the block's arithmetic
#: (16,384 against 4,096: 4% less time per step at 10M parameters on a 2-core AVX2 machine; the
#: per-thread working set, ~6 MB with hidden size 16, then stays in L3).
BLOCK = 16384


def _write_back(rule: LSTMCorrectedAdamRule, state: RuleState, new_state: RuleState) -> None:
    """Store ``new_state`` into ``state``: per-coordinate entries into the stored tensors (in
    their storage dtype), the rest by replacement."""
    for key, value in new_state.items():
        old = state.get(key)
        if (
            old is not None
            and rule.coord_dim(key) is not None
            and old.shape == value.shape
            and old is not value
        ):
            store_(old, value)
        else:
            state[key] = value


def _forward_step_(rule: LSTMCorrectedAdamRule, grad: Tensor, state: RuleState) -> Tensor:
    work = {
        k: v.to(grad.dtype) if v.is_floating_point() and rule.coord_dim(k) is not None else v
        for k, v in state.items()
    }
    update, new_state = rule(grad, work)
    _write_back(rule, state, new_state)
    return update


def chunked_ok(rule: LSTMCorrectedAdamRule, state: RuleState) -> bool:
    """Whether :func:`chunked_step_` takes ``rule``'s step on one tensor with ``state``."""
    cfg = rule.settings
    return not (
        cfg.orthogonal_mix or cfg.direction_correction or "tensor" in state or "matrices" in state
    )


def chunked_step_(
    rule: LSTMCorrectedAdamRule, grad: Tensor, state: RuleState, *, write: bool = True,
    chunk: int | None = None,
) -> Tensor:  # fmt: skip
    """The forward's step on one whole tensor, its coordinates in chunks: the per-tensor parts
    (the sums of the gradient clipping and of the step-size adaptation, a matrix's
    orthogonalized direction) over the whole tensor first, then the forward on each chunk
    (:class:`~learned_opt.rules.per_tensor.Precomputed`), so that its temporaries (the LSTM's
    gates and states, about 1.6 kB a coordinate in float64) are a chunk's, not the tensor's.
    Per-coordinate state is written chunk by chunk into ``state`` (``write``; else ``state`` is
    left as it was: the update alone, for a step checked before it is taken). Returns the
    update. Bit for bit the forward's step on a tensor of one chunk (``chunk``: :data:`BLOCK`
    coordinates on the CPU, 2**20 elsewhere); on larger ones the sums are added chunk by
    chunk (a last-bit difference)."""
    if not chunked_ok(rule, state):
        raise ValueError("this rule's step reads sums over the tensor inside its forward")
    cfg = rule.settings
    n = grad.numel()
    chunk = max(1, chunk or (BLOCK if grad.device.type == "cpu" else 1 << 20))
    spans = [(start, min(n, start + chunk)) for start in range(0, n, chunk)] or [(0, 0)]
    t = float(state["step"]) + 1
    bound = grad_bound(grad.dtype)
    coord = [k for k in state if rule.coord_dim(k) is not None]

    def part(key: str, start: int, end: int) -> Tensor:  # a chunk of the state, computed in
        return state[key].narrow(rule.coord_dim(key), start, end - start).to(grad.dtype)

    def sums(products: Any) -> Tensor:  # over the chunks, each as the forward sums a tensor
        return torch.stack(
            [per_tensor.tensor_sums(torch.stack(products(s, e)), None, 1)[:, 0] for s, e in spans]
        ).sum(0)

    clip = None
    if cfg.grad_clip > 0 and t > 1:
        c = 1 - cfg.beta2 ** (t - 1)

        def clip_terms(s: int, e: int) -> tuple[Tensor, Tensor]:
            g = bounded_grad(grad[s:e])
            return g * g, part("v", s, e) / c

        g2, ref = sums(clip_terms)
        clip = per_tensor.clip_scale(cfg, g2[None], ref[None], t)

    def clipped(s: int, e: int) -> Tensor:
        g = bounded_grad(grad[s:e])
        return g if clip is None else g * clip

    new: dict[str, Any] = {}
    log_step = None
    if cfg.lr_adapt > 0:

        def adapt_terms(s: int, e: int) -> tuple[Tensor, Tensor, Tensor]:
            g, prev = clipped(s, e), part("prev", s, e)
            return -g * prev, g * g, prev * prev

        dot, g2, p2 = sums(adapt_terms)
        size = grad.new_full((1,), n)
        per = {  # one number per tensor, also from a state that kept one per coordinate
            k: per_tensor.per_tensor_state(state, k, None, 1).to(grad.dtype)
            for k in per_tensor.PER_TENSOR_KEYS
            if k in state
        }
        log_step = per_tensor.adapt_from_sums(
            cfg, dot[None], g2[None], p2[None], per, new, t, rule.controller(), size
        )
    direction = None
    if "matrix" in state:
        direction = _matrix_direction(rule, grad, state, t, bound, 1.0 if clip is None else clip)
    update = torch.empty_like(grad)
    for start, end in spans:
        sub = {k: part(k, start, end) if k in coord else v for k, v in state.items()}
        sub.pop("matrix", None)
        given = per_tensor.Precomputed(
            clip, log_step, new, None if direction is None else direction[start:end]
        )
        out, new_state = rule(grad[start:end], sub, given)
        update[start:end] = out
        if write:
            for key in coord:
                if key in new_state:
                    stored = state[key].narrow(rule.coord_dim(key), start, end - start)
                    store_(stored, new_state[key])
    if write:
        state.update(new)
        state["step"].add_(1)
    return update


def _fused_ok(rule: LSTMCorrectedAdamRule, grad: Tensor, state: RuleState) -> bool:
    cfg = rule.settings
    if not (
        grad.device.type == "cpu"
        and grad.dtype == torch.float32
        and grad.dim() == 1
        and grad.is_contiguous()
        and cfg.lstm
        and cfg.scale_invariant
        and cfg.nominal
        and cfg.hidden_size % 4 == 0
        and cfg.num_layers <= 8
        and kernels.momenta_ok(rule)
        and "tensor" not in state
        and not cfg.orthogonal_mix  # (the forward's: it reads a second read-out first)
        and not cfg.direction_correction  # (the forward's: it sums over the tensor first)
    ):
        return False
    coord = [k for k, v in state.items() if rule.coord_dim(k) is not None]
    if not kernels.state_layout_ok(rule, state, coord):
        return False
    if any(not state[k].is_contiguous() or state[k].device.type != "cpu" for k in coord):
        return False
    weights = [t for ts in rule.layer_weights() for t in ts] + [rule.out_weight, rule.out_bias]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in weights):
        return False
    return kernels._load_corrected_adam() is not None


def _lean_ok(rule: LSTMCorrectedAdamRule, grad: Tensor, state: RuleState) -> bool:
    """Whether :func:`_lean_step_` takes the step: a rule without its LSTM (``lstm=False``) on
    one whole tensor whose state is stored in the gradient's dtype."""
    cfg = rule.settings
    coord = [k for k, v in state.items() if rule.coord_dim(k) is not None]
    return (
        not cfg.lstm
        and grad.dim() == 1
        and "tensor" not in state
        and all(state[k].dtype == grad.dtype and state[k].is_contiguous() for k in coord)
    )


def _lean_step_(rule: LSTMCorrectedAdamRule, grad: Tensor, state: RuleState) -> Tensor:
    """The forward's step of a rule without its LSTM, its momentum, second moment and last
    direction updated in place (the same operations in the same order: bit for bit the
    forward's)."""
    cfg = rule.settings
    step = state["step"] + 1
    t = float(step)
    g = bounded_grad(grad)
    if cfg.grad_clip > 0 and t > 1:
        v_hat = state["v"] / (1 - cfg.beta2 ** (t - 1))
        g = per_tensor.clip(cfg, g, v_hat, None, 1, t)
    m = state["m0"].lerp_(g, 1 - cfg.beta1)
    v = state["v"].mul_(cfg.beta2).add_((1 - cfg.beta2) * g * g)
    denom = v.sqrt().div_((1 - cfg.beta2**t) ** 0.5).add_(cfg.eps)
    direction = (m / (1 - cfg.beta1**t)).div_(denom).neg_()
    if "matrix" in state:  # Muon's: the Nesterov momentum, orthogonalized
        layout = torch.cat((state["matrix"].new_zeros(1), state["matrix"]))[None]
        direction = matrices_direction(m, g, direction, cfg.beta1, layout, cfg.orthogonal_rms)
    new: dict[str, Any] = {}
    if cfg.lr_adapt > 0:
        log_step = per_tensor.adapt_log_step(cfg, g, state, new, None, 1, t, rule.controller())
        state["prev"].copy_(direction)
        direction = direction.mul_(torch.exp(log_step))
    state.update(new)
    state["step"] = step
    return direction.mul_(torch.exp(rule.log_lr))


def _packed(rule: LSTMCorrectedAdamRule) -> tuple[Tensor, Tensor]:
    """The LSTM weights packed for the fused kernel, cached while they are unchanged."""
    weights = [t for ts in rule.layer_weights() for t in ts]
    key = tuple((t.data_ptr(), t._version) for t in weights)
    cached = getattr(rule, "_packed_lstm", None)
    if cached is None or cached[0] != key:
        w_ih, w_hh, bias = rule.layer_weights()
        cached = (key, *kernels._load().pack_lstm(w_ih, w_hh, bias))
        rule._packed_lstm = cached
    return cached[1], cached[2]


def _device_step_(
    rule: LSTMCorrectedAdamRule, grad: Tensor, state: RuleState, kernel: Any
) -> Tensor:
    """The step on a GPU tensor: the per-tensor part in two Triton kernels (the sums, then the
    arithmetic), the rest one more; with a learned controller, the sums as PyTorch reductions and
    the arithmetic as in the forward (on the device). Nothing waits for the device (the step
    counter is on the host, :func:`step_`). ``kernel``: the module
    :mod:`learned_opt.kernels.corrected_adam_triton` (imported by the caller only for GPU
    tensors)."""
    cfg = rule.settings
    t = float(state["step"]) + 1
    bound = grad_bound(grad.dtype)
    controller = rule.controller()
    if controller is None:
        limit, rate = per_tensor.clip_limit(cfg, t), per_tensor.adapt_rate(cfg, t)
        fused = kernel.per_tensor_(rule, grad, state, t, bound, limit, rate)
        if fused is None:  # the kernels failed to compile or launch here (they warned)
            return _forward_step_(rule, grad, state)
        clip, exp_s, new = fused
        return _commit(rule, grad, state, kernel, t, bound, clip, exp_s, new)
    clip = grad.new_ones(1)
    if cfg.grad_clip > 0 or cfg.lr_adapt > 0:
        g = grad.clamp(-bound, bound)
    if cfg.grad_clip > 0 and t > 1:
        ref = state["v"].sum(dtype=torch.float32) / (1 - cfg.beta2 ** (t - 1))
        clip = per_tensor.clip_scale(cfg, torch.dot(g, g)[None], ref[None], t)
    new: dict[str, Any] = {}
    exp_s = None
    if cfg.lr_adapt > 0:
        g = g * clip
        prev = state["prev"].float()
        sums = [-torch.dot(g, prev)[None], torch.dot(g, g)[None], torch.dot(prev, prev)[None]]
        size = grad.new_full((1,), grad.numel(), dtype=torch.float32)
        log_step = per_tensor.adapt_from_sums(cfg, *sums, state, new, t, controller, size)
        exp_s = torch.exp(log_step)
    return _commit(rule, grad, state, kernel, t, bound, clip, exp_s, new)


def _commit(
    rule: LSTMCorrectedAdamRule, grad: Tensor, state: RuleState, kernel: Any, t: float,
    bound: float, clip: Tensor, exp_s: Tensor | None, new: RuleState,
) -> Tensor:  # fmt: skip
    """The main pass on the device (a matrix's orthogonalized direction first, by PyTorch on
    the device), then the new per-tensor state and the step counter."""
    direction = None
    if "matrix" in state:
        direction = _matrix_direction(rule, grad, state, t, bound, clip)
    update = kernel.step_(rule, grad, state, t, bound, clip, exp_s, direction)
    if update is None:  # the kernel failed to compile or launch here (it warned)
        return _forward_step_(rule, grad, state)
    state.update(new)
    state["step"].add_(1)
    return update


def _matrix_direction(
    rule: LSTMCorrectedAdamRule, grad: Tensor, state: RuleState, t: float, bound: float,
    scale: float | Tensor,
) -> Tensor:  # fmt: skip
    """The forward's orthogonalized direction of a matrix (``orthogonal``), from the state
    before the kernel updates it (the new momentum and second moment computed here as the
    kernel will: equal up to the last bit on the CPU). ``scale``: the gradient clipping's
    factor (a one-element tensor on the GPU, so that nothing waits for the device)."""
    cfg = rule.settings
    g = grad.clamp(-bound, bound) * scale
    k = rule._state_betas.index(cfg.beta1)
    m = torch.lerp(state[f"m{k}"].to(g.dtype), g, 1 - cfg.beta1)
    adam = None
    if cfg.orthogonal_rms:
        v = state["v"].to(g.dtype) * cfg.beta2 + (1 - cfg.beta2) * g * g
        adam = (m / (1 - cfg.beta1**t)) / (v.sqrt() / (1 - cfg.beta2**t) ** 0.5 + cfg.eps)
    rows, cols = (int(n) for n in state["matrix"])
    return matrix_direction(m, g, cfg.beta1, rows, cols, adam).contiguous()


@torch.no_grad()
def step_(rule: LSTMCorrectedAdamRule, grad: Tensor, state: RuleState) -> Tensor:
    """``rule.forward``'s step on one whole tensor's flat gradient ``grad``, with ``state``
    updated in place (per-coordinate entries may be stored in another dtype, e.g. bfloat16: the
    step is computed in ``grad``'s and they are rounded back). Returns the update. The step
    counter is kept on the host, as ``torch.optim`` keeps its own: every path reads it each
    step, and on a GPU nothing then waits for the device."""
    if state["step"].device.type != "cpu":
        state["step"] = state["step"].cpu()
    count = 1
    for key in per_tensor.PER_TENSOR_KEYS:  # per tensor, in the compute dtype
        if key in state:
            value = per_tensor.per_tensor_state(state, key, state.get("tensor"), count)
            if "tensor" not in state:
                state[key] = value.to(grad.dtype)
    if grad.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        from ..kernels import corrected_adam_triton  # imports Triton: only for GPU tensors

        if corrected_adam_triton.supported(rule, grad, state):
            return _device_step_(rule, grad, state, corrected_adam_triton)
    if _lean_ok(rule, grad, state):
        return _lean_step_(rule, grad, state)
    if not _fused_ok(rule, grad, state):
        if chunked_ok(rule, state):
            return chunked_step_(rule, grad, state)
        return _forward_step_(rule, grad, state)
    cfg = rule.settings
    ext = kernels._load_corrected_adam()
    t = float(state["step"] + 1)
    bound = grad_bound(grad.dtype)
    scale = torch.ones(1)
    if cfg.grad_clip > 0 and t > 1:
        g2, ref = ext.clip_sums(grad, state["v"], bound, 1 - cfg.beta2 ** (t - 1), BLOCK)
        scale = per_tensor.clip_scale(cfg, g2[None], ref[None], t)
    new: dict[str, Any] = {}
    exp_s = 1.0
    prev = state.get("prev", grad.new_empty(0))
    if cfg.lr_adapt > 0:
        dot, g2, p2 = ext.adapt_sums(grad, prev, bound, float(scale), BLOCK)
        size = torch.full((1,), float(grad.numel()))
        log_step = per_tensor.adapt_from_sums(
            cfg, dot[None], g2[None], p2[None], state, new, t, rule.controller(), size
        )
        exp_s = float(torch.exp(log_step))
    layers = range(cfg.num_layers)
    betas = rule._state_betas
    direction = grad.new_empty(0)  # (Adam's, computed by the kernel)
    if "matrix" in state:
        direction = _matrix_direction(rule, grad, state, t, bound, float(scale))
    scalars = [
        bound,
        float(scale),
        cfg.beta2,
        1 - cfg.beta2,
        (1 - cfg.beta2**t) ** 0.5,
        cfg.eps,
        1 - 0.9**t,
        math.exp(-rule.preprocess_p),
        rule.preprocess_p,
        cfg.a_bound,
        rule.output_scale,
        exp_s,
        float(torch.exp(rule.log_lr)),
    ]
    for beta in betas:
        scalars += [1 - beta, 1 - beta**t]
    packed, offsets = _packed(rule)
    update = ext.step_(
        grad,
        [state[f"m{k}"] for k in range(len(betas))],
        state["v"],
        state["v_fast"],
        prev,
        [state[f"h{layer}"] for layer in layers],
        [state[f"c{layer}"] for layer in layers],
        packed,
        offsets,
        kernels._load().lstm_block_address(),
        rule.in_size,
        rule.out_weight,
        rule.out_bias,
        scalars,
        betas.index(cfg.beta1),
        BLOCK,
        direction,
    )
    state.update(new)
    state["step"].add_(1)
    return update
