"""The coordinatewise LSTM optimizer of Andrychowicz et al. (2016)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import kernels
from ..preprocess import log_sign
from .base import RuleState, UpdateRule, step_count

__all__ = ["LSTMRule"]


class LSTMRule(UpdateRule):
    r"""Coordinatewise LSTM update rule ("Learning to learn by gradient descent by gradient
    descent", Andrychowicz et al., NeurIPS 2016).

    One small LSTM with shared weights theta runs on every coordinate i of the optimizee, with its
    own hidden state per coordinate:

    .. math::
        x_t^i = \mathrm{preprocess}(g_t^i), \qquad
        (o_t^i, s_{t+1}^i) = \mathrm{LSTM}_\theta(x_t^i, s_t^i), \qquad
        \Delta_t^i = \alpha\,(w^\top o_t^i + b)

    where ``preprocess`` is :func:`~learned_opt.preprocess.log_sign` (or the raw gradient) and
    :math:`\alpha` is the output scale. The optimizee is updated by
    :math:`\phi_{t+1} = \phi_t + \Delta_t`.

    Each layer's four gates are computed by two matrix products over all coordinates at once
    (``addmm`` with the input and the recurrent weights), so the cost is a handful of large
    kernels per layer, independent of the number of parameter tensors. On CPU in float32 with a
    first-order gradient (the meta-training case), :meth:`forward` is instead one fused kernel
    call with a fused backward (:func:`learned_opt.kernels.fused_rule`, same math).

    Args:
        hidden_size: LSTM units per layer (20 in the paper).
        num_layers: stacked LSTM layers (2 in the paper).
        preprocess: ``"log_sign"`` (the paper) or ``"none"`` (raw gradient as one input).
        preprocess_p: the scale ``p`` of the log/sign preprocessing (10 in the paper, 5 in the
            original TensorFlow code).
        output_scale: :math:`\alpha`, the factor on the linear read-out (0.1 in the paper).
        forget_bias: initial bias of the forget gates.
    """

    kind = "lstm"

    def __init__(
        self,
        hidden_size: int = 20,
        num_layers: int = 2,
        *,
        preprocess: str = "log_sign",
        preprocess_p: float = 10.0,
        output_scale: float = 0.1,
        forget_bias: float = 1.0,
    ) -> None:
        super().__init__()
        if hidden_size < 1 or num_layers < 1:
            raise ValueError(
                f"Invalid LSTM size: hidden_size={hidden_size}, num_layers={num_layers}"
            )
        if preprocess not in ("log_sign", "none"):
            raise ValueError(f"Invalid preprocess: {preprocess!r} (use 'log_sign' or 'none')")
        if preprocess_p <= 0:
            raise ValueError(f"Invalid preprocess_p: {preprocess_p}")
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.preprocess = preprocess
        self.preprocess_p = float(preprocess_p)
        self.output_scale = float(output_scale)
        self.forget_bias = float(forget_bias)
        in_size = 2 if preprocess == "log_sign" else 1
        h = hidden_size
        for layer in range(num_layers):
            n_in = in_size if layer == 0 else h
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(n_in, 4 * h)))
            self.register_parameter(f"weight_hh_l{layer}", nn.Parameter(torch.empty(h, 4 * h)))
            self.register_parameter(f"bias_l{layer}", nn.Parameter(torch.empty(4 * h)))
        self.out_weight = nn.Parameter(torch.empty(h, 1))
        self.out_bias = nn.Parameter(torch.empty(1))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """U(-1/sqrt(H), 1/sqrt(H)) like ``nn.LSTM``; forget gates start at ``forget_bias``."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for _name, param in self.named_parameters():
                param.uniform_(-bound, bound, generator=generator)
            h = self.hidden_size
            for layer in range(self.num_layers):
                getattr(self, f"bias_l{layer}")[h : 2 * h].fill_(self.forget_bias)
            self.out_bias.zero_()

    def init_state(self, numel: int, *, like: Tensor) -> RuleState:
        """Zero hidden and cell states ``h{l}``, ``c{l}`` of shape ``(numel, hidden_size)``."""
        state: RuleState = {}
        for layer in range(self.num_layers):
            for kind in ("h", "c"):
                state[f"{kind}{layer}"] = torch.zeros(
                    numel, self.hidden_size, dtype=like.dtype, device=like.device
                )
        state["step"] = torch.zeros((), dtype=torch.float32, device=like.device)
        return state

    def coord_dim(self, key: str) -> int | None:
        return None if key == "step" else 0

    def inputs(self, grad: Tensor) -> Tensor:
        """Per-coordinate network inputs, shape ``(n, in_size)``."""
        if self.preprocess == "log_sign":
            return log_sign(grad, self.preprocess_p)
        return grad.unsqueeze(-1)

    def _gate_scale(self, like: Tensor) -> Tensor:
        h = self.hidden_size
        scale = torch.ones(4 * h, dtype=like.dtype, device=like.device)
        scale[2 * h : 3 * h] = 2.0
        return scale

    def _layer_weights(self, layer: int) -> tuple[Tensor, Tensor]:
        """``W = [W_ih; W_hh]`` of shape ``(in + H, 4H)`` and the bias: the gates of a layer are
        one matrix product ``[x, h] @ W + b``."""
        w = torch.cat((getattr(self, f"weight_ih_l{layer}"), getattr(self, f"weight_hh_l{layer}")))
        return w, getattr(self, f"bias_l{layer}")

    def _cell(self, gates: Tensor, c_prev: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        """``(h, c)`` from the gate pre-activations, differentiable, with the fused kernel when
        possible. The fallback computes all four gates with ONE sigmoid, using
        tanh(z) = 2 sigmoid(2z) - 1 (torch's CPU tanh is ~4x slower than its sigmoid)."""
        fused = kernels.fused_cell(gates, c_prev)
        if fused is not None:
            return fused
        i, f, g, o = torch.sigmoid(gates * scale).split(self.hidden_size, dim=1)
        c = torch.addcmul(f * c_prev, i, 2.0 * g - 1.0)
        return o * (2.0 * torch.sigmoid(2.0 * c) - 1.0), c

    def _kernel_args(self, state: RuleState) -> tuple[Any, ...]:
        """States and weights as the fused kernels take them (lists per layer)."""
        layers = range(self.num_layers)
        return (
            [state[f"h{layer}"] for layer in layers],
            [state[f"c{layer}"] for layer in layers],
            [getattr(self, f"weight_ih_l{layer}") for layer in layers],
            [getattr(self, f"weight_hh_l{layer}") for layer in layers],
            [getattr(self, f"bias_l{layer}") for layer in layers],
            self.out_weight,
            self.out_bias,
        )

    def _kernel_kwargs(self) -> dict[str, Any]:
        return {
            "preprocess_p": self.preprocess_p if self.preprocess == "log_sign" else None,
            "output_scale": self.output_scale,
        }

    def forward(self, grad: Tensor, state: RuleState) -> tuple[Tensor, RuleState]:
        fused = kernels.fused_rule(grad, *self._kernel_args(state), **self._kernel_kwargs())
        if fused is not None:
            update, hs, cs = fused
            new_state = {f"h{layer}": h for layer, h in enumerate(hs)}
            new_state.update({f"c{layer}": c for layer, c in enumerate(cs)})
            new_state["step"] = step_count(state, grad)
            return update, new_state
        x = self.inputs(grad)
        scale = self._gate_scale(self.weight_ih_l0)
        new_state: RuleState = {}
        for layer in range(self.num_layers):
            w, bias = self._layer_weights(layer)
            gates = torch.addmm(bias, torch.cat((x, state[f"h{layer}"]), dim=1), w)
            h, c = self._cell(gates, state[f"c{layer}"], scale)
            new_state[f"h{layer}"] = h
            new_state[f"c{layer}"] = c
            x = h
        update = torch.addmm(self.out_bias, x, self.out_weight).squeeze(-1) * self.output_scale
        new_state["step"] = step_count(state, grad)
        return update, new_state

    @torch.no_grad()
    def step_(self, grad: Tensor, state: RuleState, *, chunk: int = 4096) -> Tensor:
        """Inference fast path: the same math as :meth:`forward`, updating ``state`` in place.

        Used by the drop-in optimizer. On CPU with float32 gradients (and float32 or bfloat16
        states) the whole step is one fused kernel call (:func:`learned_opt.kernels.fused_step_`:
        cache-sized blocks of coordinates spread over the threads, preprocessing, gate products,
        cells and read-out per block). Otherwise coordinates are processed in chunks of ``chunk``
        rows so that the working set (``chunk x 4H`` gates plus states) stays in cache, with
        preallocated buffers; per layer, one ``addmm`` for the four gates and one fused in-place
        cell kernel (or the in-place PyTorch fallback).

        The hidden and cell states may be stored in another dtype than ``grad``'s (e.g. bfloat16
        states for float32 gradients, half the memory): each chunk of them is then upcast into
        a buffer of ``grad``'s dtype, the step is computed in that dtype, and the new states are
        rounded back into the stored ones.

        Returns:
            the update, shape ``(n,)``.
        """
        update = kernels.fused_step_(grad, *self._kernel_args(state), **self._kernel_kwargs())
        if update is not None:
            state["step"].add_(1)
            return update
        n = grad.numel()
        h_size = self.hidden_size
        if grad.device.type != "cpu":
            chunk = max(n, 1)  # one pass on accelerators: kernel launches cost more than cache
        chunk = max(1, min(chunk, n))
        like = dict(dtype=grad.dtype, device=grad.device)
        weights = [self._layer_weights(layer) for layer in range(self.num_layers)]
        update = torch.empty(n, **like)
        gates_buf = torch.empty(chunk, 4 * h_size, **like)
        tanh_buf = torch.empty(chunk, h_size, **like)
        xh_bufs = [torch.empty(chunk, w.shape[0], **like) for w, _ in weights]
        mixed = any(
            state[f"{kind}{layer}"].dtype != grad.dtype
            for layer in range(self.num_layers)
            for kind in ("h", "c")
        )
        if mixed:  # compute buffers for states stored in another dtype
            h_buf = torch.empty(chunk, h_size, **like)
            c_buf = torch.empty(chunk, h_size, **like)
        scale = self._gate_scale(grad)
        for start in range(0, n, chunk):
            end = min(n, start + chunk)
            m = end - start
            x = self.inputs(grad[start:end])
            for layer, (w, b) in enumerate(weights):
                h_stored = state[f"h{layer}"][start:end]
                c_stored = state[f"c{layer}"][start:end]
                xh = xh_bufs[layer][:m]
                n_in = x.shape[1]
                xh[:, :n_in].copy_(x)
                xh[:, n_in:].copy_(h_stored)
                if mixed:
                    h, c = h_buf[:m], c_buf[:m].copy_(c_stored)
                else:
                    h, c = h_stored, c_stored
                gates = torch.addmm(b, xh, w, out=gates_buf[:m])
                if not (h.is_contiguous() and kernels.fused_cell_(gates, c, h)):
                    gates.mul_(scale).sigmoid_()
                    i, f, g, o = gates.split(h_size, dim=1)
                    g.mul_(2.0).sub_(1.0)
                    c.mul_(f).addcmul_(i, g)
                    t = tanh_buf[:m]
                    torch.mul(c, 2.0, out=t).sigmoid_().mul_(2.0).sub_(1.0)  # tanh(c)
                    torch.mul(o, t, out=h)
                if mixed:
                    h_stored.copy_(h)
                    c_stored.copy_(c)
                x = h  # the next layer (and the read-out) use the unrounded value
            torch.addmm(self.out_bias, x, self.out_weight, out=update[start:end].view(m, 1))
        update.mul_(self.output_scale)
        state["step"].add_(1)
        return update

    def config(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "preprocess": self.preprocess,
            "preprocess_p": self.preprocess_p,
            "output_scale": self.output_scale,
            "forget_bias": self.forget_bias,
        }
