r"""An Adam step corrected per coordinate by a small LSTM, with per-tensor step-size adaptation:
the rule behind the default weights of :class:`~learned_opt.LSTMOptimizer`.

The paper's LSTM (:class:`~learned_opt.rules.LSTMRule`) reads the raw gradient and writes the
whole update. Three changes make a learned rule transfer to models, loss scales and horizons it
never saw:

- **scale-invariant inputs** (RNNprop, Lv et al., 2017; the hierarchical RNN optimizer,
  Wichrowska et al., 2017): the LSTM reads momenta at several timescales and the gradient, each
  divided by the root of a running second moment, so multiplying the loss by a constant changes
  nothing it sees;
- **a nominal Adam step that the LSTM only corrects** (Wichrowska et al., 2017; Metz et al.,
  2022): the LSTM's read-out scales Adam's direction per coordinate by a bounded factor. With a
  zero read-out (the initialization) the rule *is* Adam, so meta-training starts from a strong
  optimizer;
- **per-tensor step-size adaptation** (the multiplicative hypergradient rule of Baydin et al.,
  2018, and the learned learning-rate state of the hierarchical RNN optimizer): each parameter
  tensor keeps a log step size that grows while the new gradient keeps pointing along the last
  update and shrinks when it turns against it, so the step finds its scale over a run as long
  as it needs (tuned Adam's best learning rate spans 0.003 to 1 on the out-of-distribution
  benchmark; a rule meta-trained on short unrolls does not learn that by itself).

Four stabilizers make the adaptation fast early and safe late (README): a warm-up of the
adaptation rate, a faster shrink on a clear overshoot, per-tensor clipping of gradients much
larger than their running RMS (with a looser threshold early), and slower growth once a tensor's
gradient norm has fallen far below its peak.

The configuration is :class:`~learned_opt.rules.LSTMCorrectedAdamConfig`, whose defaults are the
shipped configuration. The per-tensor parts are in :mod:`learned_opt.rules.per_tensor`; the
drop-in optimizer's in-place step is in :mod:`learned_opt.rules.corrected_adam_step`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import kernels
from ..preprocess import log_sign
from . import corrected_adam_step, per_tensor
from .base import RuleState, UpdateRule, bounded_grad, safe_sqrt, slow_average, step_count
from .corrected_adam_config import (
    GENERAL_LSTM_DEFAULTS,
    LSTMCorrectedAdamConfig,
    options_from_saved,
)
from .orthogonal import matrices_direction, matrix_layout

__all__ = ["LSTMCorrectedAdamRule"]


class LSTMCorrectedAdamRule(UpdateRule):
    r"""Adam's step, scaled per coordinate by a small LSTM and per tensor by an adapted step size.

    Per coordinate with gradient :math:`g_t` (each tensor's gradient first clipped, see below),
    the rule keeps Adam's moments :math:`m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t`,
    :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2`, momenta :math:`m^{(k)}_t` for
    :math:`\beta_k \in (0.5, 0.9, 0.99, 0.999)` (the one with :math:`\beta_1` is :math:`m_t`)
    and a fast second moment :math:`v^{fast}_t` (:math:`\beta = 0.9`), all bias-corrected
    (:math:`\hat x_t = x_t / (1 - \beta^t)`). With :math:`D_t = \sqrt{\hat v_t} + \epsilon`:

    **Inputs** of the LSTM: :math:`g_t / D_t`, :math:`\hat m^{(k)}_t / D_t` for the four
    :math:`\beta_k`, :math:`\ell(|g_t| / D_t)` and
    :math:`\ell\big((\sqrt{\hat v^{fast}_t} + \epsilon) / D_t\big)` with
    :math:`\ell(x) = \log(\max(x, e^{-10})) / 10`. Each is a ratio of quantities that scale
    alike with the gradient: multiplying the loss by a constant changes no input (up to
    :math:`\epsilon`).

    **Step**: the LSTM (hidden and cell states per coordinate, weights shared) gives
    :math:`r = 0.1\,(w^\top h_t + b)`, and

    .. math::
        a = A \tanh(r / A), \qquad u_t = -\frac{\hat m_t}{D_t}\, e^{a}, \qquad
        \Delta_t = \eta\, e^{s_t} u_t,

    with :math:`\eta` the base learning rate (``lr``) and :math:`s_t` the tensor's log step size:

    .. math::
        s_t = \operatorname{clip}\big(s_{t-1} + \kappa_t\, c_t,\ \pm S\big), \qquad
        c_t = \cos(-g^P_t, u^P_{t-1}),

    the cosine between the tensor's negative gradient and its previous direction
    (:math:`c = 0` at the first step or for a zero vector), with
    :math:`\kappa_t = \kappa (1 + B e^{-t/\tau})` (a fast start), cosines below :math:`-\mu`
    counted :math:`D` times (a clear overshoot shrinks the step fast; minibatch noise does not
    bias it down), and positive cosines counted ``lr_adapt_slowdown_rate`` times once the
    tensor's gradient norm (a running RMS, :math:`\beta = 0.9`) has fallen below :math:`1/R` of
    its peak (near an interpolating minimum the gradient keeps one direction while the loss is
    already tiny). The cosine does not depend on the gradient's scale.

    **Clipping**: from the second step on, each tensor's gradient is scaled by
    :math:`\min\big(1, \sqrt{Q_t \sum_P \hat v_{t-1} / \sum_P g_t^2}\big)` before anything reads
    it (where :math:`\sum_P \hat v_{t-1} > 0`), :math:`Q_t = Q (1 + C e^{-t/\tau})`: after a quiet
    stretch one rare large gradient would otherwise move Adam's direction by up to about 3 per
    coordinate for tens of steps, which a grown step size turns into a blow-up.

    :math:`e^{a} \in [e^{-A}, e^{A}]` (:math:`A \tanh(r/A)` has slope 1 at 0) and
    :math:`e^{s_t} \in [e^{-S}, e^{S}]`, so the step is at most :math:`\eta e^{A + S}` times
    Adam's normalized direction: it cannot explode where Adam would not. With a zero read-out
    (:meth:`reset_parameters`) and no adaptation (``lr_adapt=0``, ``grad_clip=0``) it is exactly
    Adam (``lr``, ``betas=(beta1, beta2)``, ``eps``).

    Options (:class:`~learned_opt.rules.LSTMCorrectedAdamConfig`, defaults: the shipped
    configuration) also allow an additive correction :math:`\eta\, r_b` read out of the LSTM
    (``additive``), a learned turn of each tensor's direction at its own root mean square
    (``direction_correction``), a meta-learned :math:`\log\eta` (``learn_lr``), and the two
    ablations that turn one of the first two changes off (``scale_invariant=False``: the
    paper's log/sign inputs; ``nominal=False``: :math:`u_t = r`, no Adam step). ``lstm=False``
    drops the LSTM and its read-out (:math:`a = 0`): the hand-designed direction moved by the
    per-tensor step size alone, with Adam's momentum and second moment and ``prev`` as its only
    per-coordinate state.

    State per coordinate: the momenta ``m0..m3``, ``v``, ``v_fast``, the previous direction
    ``prev`` and the LSTM's ``h{l}``, ``c{l}`` (``(n, hidden_size)``); per tensor: ``log_step``,
    ``grad_fast``, ``grad_peak`` (shape ``(T,)``); the step counter. The unroll passes the tensor
    layout of its flat vector (``init_state(..., numels=...)``, stored as ``tensor``: each
    coordinate's tensor index); the drop-in optimizer calls the rule on each tensor whole, in
    place (:meth:`step_`).

    Args:
        config: the configuration (default: the shipped one).
        **options: fields of ``config`` to change, e.g. ``hidden_size=8``.
    """

    kind = "general-lstm"
    #: Timescales of the momentum inputs.
    momentum_betas = (0.5, 0.9, 0.99, 0.999)
    #: The factor on the read-out.
    output_scale = 0.1
    #: Scale :math:`p` of the log features and of the log/sign inputs (``scale_invariant=False``).
    preprocess_p = 10.0
    #: Initial bias of the forget gates.
    forget_bias = 1.0

    def __init__(self, config: LSTMCorrectedAdamConfig | None = None, **options: Any) -> None:
        super().__init__()
        cfg = (config or LSTMCorrectedAdamConfig()).replace(**options)
        self.settings = cfg
        for key, value in cfg.to_dict().items():  # rule.lr, rule.lr_adapt, ...
            setattr(self, key, value)
        # Momentum state: one buffer per distinct beta; Adam's direction shares its beta1 buffer.
        betas = list(self.momentum_betas) if cfg.scale_invariant and cfg.lstm else []
        if cfg.nominal and cfg.beta1 not in betas:
            betas.append(cfg.beta1)
        self._state_betas = tuple(betas)
        self.in_size = self.num_inputs()
        h = cfg.hidden_size
        for layer in range(cfg.num_layers if cfg.lstm else 0):
            n_in = self.in_size if layer == 0 else h
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(n_in, 4 * h)))
            self.register_parameter(f"weight_hh_l{layer}", nn.Parameter(torch.empty(h, 4 * h)))
            self.register_parameter(f"bias_l{layer}", nn.Parameter(torch.empty(4 * h)))
        if cfg.lstm:
            n_out = 2 if cfg.nominal and cfg.additive else 1
            self.out_weight = nn.Parameter(torch.empty(h, n_out))
            self.out_bias = nn.Parameter(torch.empty(n_out))
        if cfg.nominal:
            log_lr = torch.tensor(math.log(cfg.lr))
            if cfg.learn_lr:
                self.log_lr = nn.Parameter(log_lr)
            else:
                self.register_buffer("log_lr", log_lr)
        k = cfg.controller_hidden
        if k > 0:
            n_feat = per_tensor.CONTROLLER_FEATURES
            self.controller_w1 = nn.Parameter(torch.empty(n_feat, k))
            self.controller_b1 = nn.Parameter(torch.empty(k))
            if not cfg.lr_adapt_learned:  # the gain (the learned adaptation has none)
                self.controller_w2 = nn.Parameter(torch.empty(k, 1))
                self.controller_b2 = nn.Parameter(torch.empty(1))
            if cfg.controller_drift > 0:
                self.controller_drift_w = nn.Parameter(torch.empty(k, 1))
                self.controller_drift_b = nn.Parameter(torch.empty(1))
            if cfg.lr_adapt_learned:
                self.controller_linear = nn.Parameter(torch.empty(n_feat, 1))
            if cfg.controller_size:  # the size's weights, apart: older weights load unchanged
                self.controller_size_w = nn.Parameter(torch.empty(1, k))
                if cfg.lr_adapt_learned:
                    self.controller_size_linear = nn.Parameter(torch.empty(1, 1))
        if cfg.orthogonal_mix:
            self.mix_weight = nn.Parameter(torch.empty(h, 1))
            self.mix_bias = nn.Parameter(torch.empty(1))
        if cfg.direction_correction:
            self.correction_weight = nn.Parameter(torch.empty(h, 1))
            self.correction_bias = nn.Parameter(torch.empty(1))
        if not cfg.learn_lstm and cfg.lstm:
            for t in [w for ws in self.layer_weights() for w in ws]:
                t.requires_grad_(False)
            self.out_weight.requires_grad_(False)
            self.out_bias.requires_grad_(False)
        self.reset_parameters()

    @classmethod
    def from_config(
        cls, saved: Mapping[str, Any], defaults: LSTMCorrectedAdamConfig = GENERAL_LSTM_DEFAULTS
    ) -> LSTMCorrectedAdamRule:
        """The rule a saved configuration (:meth:`config`, or ``--rule-kwargs``) describes, with
        the options it leaves out at ``defaults`` (by default those of the former keyword
        interface, as saved ``"general-lstm"`` configurations assume).

        Raises:
            ValueError: an option that was removed, at a value other than its remaining one
                (:data:`~learned_opt.rules.corrected_adam_config.REMOVED_OPTIONS`); an unknown
                option or an invalid value.
        """
        return cls(options_from_saved(saved, defaults))

    # ----------------------------------------------------------------------------- set-up
    def num_inputs(self) -> int:
        """Inputs per coordinate: 7 (gradient, four momenta, two log ratios), or 2 (log/sign)
        with ``scale_invariant=False``."""
        return 1 + len(self.momentum_betas) + 2 if self.scale_invariant else 2

    def reset_parameters(
        self, generator: torch.Generator | None = None, *, zero_output: bool | None = None
    ) -> None:
        """LSTM weights ~ U(-1/sqrt(H), 1/sqrt(H)) (``nn.LSTM``), forget gates at 1, base
        learning rate at ``lr``; the controller's first layer likewise (fan-in 6), its last
        layer at zero.

        The read-out starts at zero when ``zero_output`` (default: with ``nominal``), which makes
        the rule Adam with the adapted step size; otherwise it is drawn like the LSTM weights
        (bias zero).
        """
        if zero_output is None:
            zero_output = self.nominal
        bound = 1.0 / math.sqrt(self.hidden_size)
        h = self.hidden_size
        with torch.no_grad():
            for layer in range(self.num_layers if self.lstm else 0):
                for name in ("weight_ih", "weight_hh", "bias"):
                    getattr(self, f"{name}_l{layer}").uniform_(-bound, bound, generator=generator)
                getattr(self, f"bias_l{layer}")[h : 2 * h].fill_(self.forget_bias)
            if self.lstm:
                if zero_output:
                    self.out_weight.zero_()
                else:
                    self.out_weight.uniform_(-bound, bound, generator=generator)
                self.out_bias.zero_()
            if self.orthogonal_mix:  # Muon's direction
                self.mix_weight.zero_()
                self.mix_bias.zero_()
            if self.direction_correction:  # the direction unchanged
                self.correction_weight.zero_()
                self.correction_bias.zero_()
            if self.nominal:
                self.log_lr.fill_(math.log(self.lr))
            if self.controller_hidden > 0:  # its last layer at zero: the hand-designed gain 1
                n_feat = per_tensor.CONTROLLER_FEATURES
                b = 1.0 / math.sqrt(n_feat)
                self.controller_w1.uniform_(-b, b, generator=generator)
                self.controller_b1.uniform_(-b, b, generator=generator)
                if not self.lr_adapt_learned:
                    self.controller_w2.zero_()
                    self.controller_b2.zero_()
                if self.controller_drift > 0:  # and no drift
                    self.controller_drift_w.zero_()
                    self.controller_drift_b.zero_()
                if self.lr_adapt_learned:
                    self.controller_linear.zero_()
                if self.controller_size:  # and blind to the size
                    self.controller_size_w.zero_()
                    if self.lr_adapt_learned:
                        self.controller_size_linear.zero_()

    @property
    def tensor_aware(self) -> bool:
        return self.settings.tensor_aware

    @property
    def reads_shape(self) -> bool:
        return self.settings.orthogonal

    def init_state(
        self,
        numel: int,
        *,
        like: Tensor,
        numels: Sequence[int] | None = None,
        shape: Sequence[int] | None = None,
        shapes: Sequence[Sequence[int]] | None = None,
    ) -> RuleState:
        """Zero momenta ``m{k}``, second moments ``v``, ``v_fast``, LSTM states ``h{l}``,
        ``c{l}`` of shape ``(numel, hidden_size)``, and the step counter.

        With ``lr_adapt``, also the previous direction ``prev`` (per coordinate) and the log step
        size ``log_step`` (0; less for tensors larger than ``lr_size_ref``; with
        ``lr_adapt_slowdown``, ``grad_fast`` and ``grad_peak``; with the controller,
        ``cos_avg``), one per tensor. With ``lr_adapt`` or ``grad_clip``, if
        ``numels`` (the sizes of the parameter tensors the ``numel`` coordinates concatenate) is
        given, ``tensor`` (each coordinate's tensor index; without it the coordinates are one
        tensor). With ``orthogonal`` and ``shape`` (the parameter's, of 2 or more dimensions),
        ``matrix``: its rows and columns (on the CPU); with ``orthogonal`` and ``shapes`` (those
        of the ``numels`` tensors), ``matrices``: where each matrix is
        (:func:`~learned_opt.rules.orthogonal.matrix_layout`).
        """
        kw = dict(dtype=like.dtype, device=like.device)
        tensors = 1
        if self.tensor_aware and numels is not None:
            if sum(numels) != numel or any(n < 0 for n in numels):
                raise ValueError(f"numels {list(numels)} do not add up to {numel}")
            tensors = len(numels)
        state: RuleState = {}
        if self.lr_adapt > 0:
            sizes = list(numels) if self.tensor_aware and numels is not None else [numel]
            start = per_tensor.initial_log_step(self.settings, sizes)
            state["log_step"] = torch.tensor(start, **kw)
            state["prev"] = torch.zeros(numel, **kw)
            if self.lr_adapt_slowdown > 0:
                state["grad_fast"] = torch.zeros(tensors, **kw)
                state["grad_peak"] = torch.zeros(tensors, **kw)
            if self.controller_hidden > 0:
                state["cos_avg"] = torch.zeros(tensors, **kw)
        if self.tensor_aware and numels is not None:
            sizes = torch.tensor(list(numels), device=like.device)
            ids = torch.arange(len(numels), device=like.device)
            state["tensor"] = ids.repeat_interleave(sizes, output_size=numel)
        if self.orthogonal:
            if shapes is not None:
                if [math.prod(s) for s in shapes] != list(
                    numels if numels is not None else [numel]
                ):
                    raise ValueError(
                        f"shapes {[tuple(s) for s in shapes]} do not match the tensor sizes "
                        f"{list(numels) if numels is not None else [numel]}"
                    )
                state["matrices"] = matrix_layout(shapes)
            elif numels is not None and len(numels) > 1:
                raise ValueError(
                    "orthogonal reads each parameter tensor as a matrix: a flat vector of "
                    "several tensors needs their shapes (init_state(..., shapes=...))"
                )
            elif shape is not None and len(shape) >= 2 and numel > 0:
                if math.prod(shape) != numel:
                    raise ValueError(f"shape {tuple(shape)} does not have {numel} coordinates")
                state["matrix"] = torch.tensor([shape[0], numel // shape[0]])
        for k in range(len(self._state_betas)):
            state[f"m{k}"] = torch.zeros(numel, **kw)
        state["v"] = torch.zeros(numel, **kw)
        if self.scale_invariant and self.lstm:
            state["v_fast"] = torch.zeros(numel, **kw)
        for layer in range(self.num_layers if self.lstm else 0):
            state[f"h{layer}"] = torch.zeros(numel, self.hidden_size, **kw)
            state[f"c{layer}"] = torch.zeros(numel, self.hidden_size, **kw)
        state["step"] = torch.zeros((), dtype=torch.float32, device=like.device)
        return state

    def coord_dim(self, key: str) -> int | None:
        return (
            None
            if key in ("step", "matrix", "matrices") or key in per_tensor.PER_TENSOR_KEYS
            else 0
        )

    def precise_keys(self) -> frozenset[str]:
        slow = [f"m{k}" for k, beta in enumerate(self._state_betas) if slow_average(beta)]
        return frozenset(slow + (["v"] if slow_average(self.beta2) else []))

    def tensor_count(self, state: RuleState) -> int:
        """Parameter tensors the state covers (1 without a ``tensor`` layout)."""
        ids = state.get("tensor")
        if ids is None:
            return 1
        if "log_step" in state:  # one per tensor, empty tensors at the end included
            return state["log_step"].shape[0]
        return int(ids[-1]) + 1 if ids.numel() else 0

    # ----------------------------------------------------------------------------- the step
    def _inputs(
        self, grad: Tensor, moments: list[Tensor], denom: Tensor | None, v_fast_hat: Tensor | None
    ) -> Tensor:
        if not self.scale_invariant:
            return log_sign(grad, self.preprocess_p)
        assert denom is not None and v_fast_hat is not None
        feats = [grad / denom]
        feats += [moments[self._state_betas.index(b)] / denom for b in self.momentum_betas]
        p = self.preprocess_p
        floor = math.exp(-p)
        feats.append(torch.log((grad.abs() / denom).clamp_min(floor)) / p)
        ratio = (safe_sqrt(v_fast_hat) + self.eps) / denom
        feats.append(torch.log(ratio.clamp_min(floor)) / p)
        return torch.stack(feats, dim=-1)

    def layer_weights(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per layer: ``weight_ih``, ``weight_hh``, ``bias`` (none with ``lstm=False``)."""
        layers = range(self.num_layers if self.lstm else 0)
        return (
            [getattr(self, f"weight_ih_l{layer}") for layer in layers],
            [getattr(self, f"weight_hh_l{layer}") for layer in layers],
            [getattr(self, f"bias_l{layer}") for layer in layers],
        )

    def _lstm(self, x: Tensor, state: RuleState) -> tuple[list[Tensor], list[Tensor]]:
        """New hidden and cell states of every layer from the inputs ``x`` (n, in): the whole
        stack in one fused call on CPU in float32 when ``x`` is a constant (first order), else
        per layer one gate product and the fused (or PyTorch) cell."""
        layers = range(self.num_layers)
        hs = [state[f"h{layer}"] for layer in layers]
        cs = [state[f"c{layer}"] for layer in layers]
        w_ih, w_hh, bias = self.layer_weights()
        fused = kernels.fused_lstm(x, hs, cs, w_ih, w_hh, bias)
        if fused is not None:
            return fused
        new_h: list[Tensor] = []
        new_c: list[Tensor] = []
        for layer in layers:
            w = torch.cat((w_ih[layer], w_hh[layer]))
            gates = torch.addmm(bias[layer], torch.cat((x, hs[layer]), dim=1), w)
            cell = kernels.fused_cell(gates, cs[layer])  # same math, one pass
            if cell is not None:
                h, c = cell
            else:
                i, f, g, o = gates.chunk(4, dim=1)
                c = torch.sigmoid(f) * cs[layer] + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            new_h.append(h)
            new_c.append(c)
            x = h
        return new_h, new_c

    def forward(
        self,
        grad: Tensor,
        state: RuleState,
        precomputed: per_tensor.Precomputed | None = None,
    ) -> tuple[Tensor, RuleState]:
        """The update and new state for the flat gradient ``grad``. ``precomputed``: the
        per-tensor parts of this step (clipping, step size, a matrix's direction) computed over
        the whole tensor beforehand, when ``grad`` and ``state`` are a chunk of one tensor's
        coordinates (:func:`~learned_opt.rules.corrected_adam_step.chunked_step_`)."""
        if precomputed is not None and (
            "tensor" in state or self.orthogonal_mix or self.direction_correction
        ):
            raise ValueError(
                "precomputed per-tensor parts need one tensor's coordinates and a rule without "
                "orthogonal_mix or direction_correction (they read sums over the tensor)"
            )
        step = step_count(state, grad)
        t = float(step)
        grad = bounded_grad(grad)  # no finite gradient can overflow a square or a sum below
        new_state: RuleState = {"step": step}
        layout = state.get("matrices")  # (start, rows, cols) of each matrix
        if layout is not None:
            new_state["matrices"] = layout
        elif "matrix" in state:  # one tensor, a matrix from coordinate 0
            new_state["matrix"] = state["matrix"]
            layout = torch.cat((state["matrix"].new_zeros(1), state["matrix"]))[None]
        ids = state.get("tensor")
        if ids is not None:
            new_state["tensor"] = ids
        count = self.tensor_count(state)
        state = dict(state)
        for key in per_tensor.PER_TENSOR_KEYS:
            if key in state:
                state[key] = per_tensor.per_tensor_state(state, key, ids, count)
        if precomputed is not None:
            if precomputed.clip is not None:
                grad = grad * precomputed.clip
        elif self.grad_clip > 0 and t > 1:
            v_hat = state["v"] / (1 - self.beta2 ** (t - 1))
            grad = per_tensor.clip(self.settings, grad, v_hat, ids, count, t)
        moments: list[Tensor] = []  # bias-corrected momenta, by _state_betas
        raw_m: dict[float, Tensor] = {}
        for k, beta in enumerate(self._state_betas):
            m = torch.lerp(state[f"m{k}"], grad, 1 - beta)
            new_state[f"m{k}"] = m
            raw_m[beta] = m
            if self.lstm:
                moments.append(m / (1 - beta**t))
        v = state["v"] * self.beta2 + (1 - self.beta2) * grad * grad
        new_state["v"] = v
        # Adam's operation order (AdamRule), so that the nominal step matches torch.optim.
        denom = safe_sqrt(v) / (1 - self.beta2**t) ** 0.5 + self.eps
        if self.lstm:
            v_fast_hat = None
            if self.scale_invariant:
                v_fast = state["v_fast"] * 0.9 + 0.1 * grad * grad
                new_state["v_fast"] = v_fast
                v_fast_hat = v_fast / (1 - 0.9**t)
            x = self._inputs(grad, moments, denom, v_fast_hat)
            hs, cs = self._lstm(x, state)
            for layer in range(self.num_layers):
                new_state[f"h{layer}"] = hs[layer]
                new_state[f"c{layer}"] = cs[layer]
            out = torch.addmm(self.out_bias, hs[-1], self.out_weight) * self.output_scale
        if self.nominal:
            direction = -(raw_m[self.beta1] / (1 - self.beta1**t)) / denom
            if precomputed is not None and precomputed.direction is not None:
                direction = precomputed.direction
            elif (
                layout is not None and layout.numel()
            ):  # Muon's: the Nesterov momentum, orthogonalized
                adam = direction
                direction = matrices_direction(
                    raw_m[self.beta1], grad, adam, self.beta1, layout, self.orthogonal_rms
                )
                if self.orthogonal_mix:
                    mix = self._mix(hs[-1], ids, count)
                    direction = direction + mix * (adam - direction)
            if self.lstm:
                a = self.a_bound * torch.tanh(out[:, 0] / self.a_bound)
                update = direction * torch.exp(a)
            else:  # a = 0
                update = direction
            if self.direction_correction:
                update = self._corrected(update, hs[-1], ids, count)
        else:
            update = out.squeeze(-1)
        if self.lr_adapt > 0:  # the adapted size scales the direction, not the additive term
            if precomputed is not None:
                assert precomputed.log_step is not None, "the step size was not precomputed"
                log_step = precomputed.log_step
                new_state.update(precomputed.new_state)
            else:
                log_step = per_tensor.adapt_log_step(
                    self.settings, grad, state, new_state, ids, count, t, self.controller()
                )
            new_state["prev"] = update
            update = update * per_tensor.per_coordinate(torch.exp(log_step), ids)
        if not self.nominal:
            return update, new_state
        if self.additive:
            update = update + out[:, 1]
        return torch.exp(self.log_lr) * update, new_state

    def _mix(self, h: Tensor, ids: Tensor | None, count: int) -> Tensor:
        """The per-coordinate weight of Adam's direction against Muon's (``orthogonal_mix``):
        ``tanh`` of the mix read-out averaged over each tensor."""
        z = torch.addmm(self.mix_bias, h, self.mix_weight)[:, 0]
        sums = per_tensor.tensor_sums(z[None], ids, count)[0]
        sizes = (
            torch.bincount(ids, minlength=count) if ids is not None else z.new_tensor([z.numel()])
        )
        mean = sums / sizes.clamp_min(1).to(sums)
        return per_tensor.per_coordinate(torch.tanh(mean), ids)

    def _corrected(self, u: Tensor, h: Tensor, ids: Tensor | None, count: int) -> Tensor:
        """``u`` turned by the correction read-out ``c`` at its own root mean square per tensor
        (``direction_correction``): ``(u + c) |u| / |u + c|``, ``c`` the read-out times
        :attr:`output_scale` (as the first read-out); ``u`` itself where ``c`` is zero (the
        ratio of two equal sums is exactly 1), zero where ``u + c`` is."""
        c = torch.addmm(self.correction_bias, h, self.correction_weight)[:, 0] * self.output_scale
        turned = u + c
        u2, t2 = per_tensor.tensor_sums(torch.stack((u * u, turned * turned)), ids, count)
        scale = torch.where(t2 > 0, safe_sqrt(u2 / t2.clamp_min(1e-30)), torch.zeros_like(t2))
        return turned * per_tensor.per_coordinate(scale, ids)

    def variant(self, **changes: Any) -> LSTMCorrectedAdamRule:
        """This rule's configuration with ``changes``, holding this rule's weights (weights the
        new configuration adds, e.g. a controller's, keep their initialization)."""
        rule = type(self)(self.settings, **changes)
        weights = self.state_dict()
        if "lr" in changes and not rule.learn_lr:  # a fixed base rate is the new one
            weights.pop("log_lr", None)
        missing = rule.load_state_dict(weights, strict=False).missing_keys
        added = ("controller_", "mix_", "correction_")
        assert all(k.startswith(added) or k == "log_lr" for k in missing), missing
        return rule

    def controller(self) -> per_tensor.Controller | None:
        """The learned controller of the step-size adaptation, features (T, 6; 7 with
        ``controller_size``, the last the tensor's log size) -> (the log
        gain (T,), or ``None`` with ``lr_adapt_learned``; the drift (T,), or ``None`` without
        ``controller_drift``), or ``None`` without one."""
        if self.controller_hidden <= 0:
            return None
        return self._control

    def _control(self, features: Tensor) -> tuple[Tensor | None, Tensor | None]:
        size = None
        if self.controller_size:  # the last column: the tensor's log size
            features, size = features[:, :-1], features[:, -1:]
        pre = torch.addmm(self.controller_b1, features, self.controller_w1)
        if size is not None:
            pre = pre + size * self.controller_size_w
        hidden = torch.tanh(pre)
        if self.lr_adapt_learned:  # the drift alone, with a linear path from the features
            drift = torch.addmm(self.controller_drift_b, hidden, self.controller_drift_w)
            drift = drift + features @ self.controller_linear
            if size is not None:
                drift = drift + size * self.controller_size_linear
            return None, self.controller_drift * torch.tanh(drift[:, 0])
        out = torch.addmm(self.controller_b2, hidden, self.controller_w2)[:, 0]
        gain = self.controller_bound * torch.tanh(out / self.controller_bound)
        if self.controller_drift <= 0:
            return gain, None
        drift = torch.addmm(self.controller_drift_b, hidden, self.controller_drift_w)[:, 0]
        return gain, self.controller_drift * torch.tanh(drift)

    @torch.no_grad()
    def step_(self, grad: Tensor, state: RuleState) -> Tensor:
        """Inference fast path of the drop-in optimizer: :meth:`forward`'s step on one whole
        parameter tensor, updating ``state`` in place (entries may be stored in another dtype
        than ``grad``'s, e.g. bfloat16: they are computed in ``grad``'s and rounded back).
        Returns the update. See :func:`learned_opt.rules.corrected_adam_step.step_`."""
        return corrected_adam_step.step_(self, grad, state)

    def chunked_step_(self, grad: Tensor, state: RuleState, *, write: bool = True) -> Tensor | None:
        """:meth:`step_` with the forward's arithmetic on chunks of coordinates (the
        per-tensor parts first); ``write=False``: the update alone, ``state`` left as it was.
        ``None`` where the step reads sums over the tensor inside its forward
        (``orthogonal_mix``, ``direction_correction``). See
        :func:`learned_opt.rules.corrected_adam_step.chunked_step_`."""
        if not corrected_adam_step.chunked_ok(self, state):
            return None
        with torch.no_grad():
            return corrected_adam_step.chunked_step_(self, grad, state, write=write)

    def config(self) -> dict[str, Any]:
        return self.settings.to_dict()
