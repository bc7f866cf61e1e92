"""A coordinatewise LSTM rule built to generalize: scale-invariant inputs and an Adam nominal step.

The paper's LSTM (:class:`~learned_opt.rules.LSTMRule`) reads the raw gradient through the
log/sign preprocessing and writes the whole update. Two known fixes make a learned rule transfer
to models, loss scales and horizons it never saw:

- **scale-invariant inputs** (RNNprop, Lv et al., 2017; the hierarchical RNN optimizer,
  Wichrowska et al., 2017): the network reads momenta at several timescales and the gradient, each
  divided by the root of a running second moment, so multiplying the loss by a constant changes
  nothing it sees;
- **a nominal descent direction** that the network only corrects (Wichrowska et al., 2017; Metz
  et al., 2022): the Adam direction ``d = -m_hat / (sqrt(v_hat) + eps)`` scaled per coordinate
  by ``exp(a)`` and shifted by ``b``, both read out of the LSTM. With zero read-out weights
  (the default initialization) the rule *is* Adam with learning rate ``lr``, so meta-training
  starts from a strong optimizer instead of from noise.

A third fix makes the nominal step's size adapt over long horizons, which a learned rule
meta-trained on short unrolls cannot learn to do by itself:

- **per-tensor step-size adaptation** (``lr_adapt``; the multiplicative hypergradient rule of
  Baydin et al., 2018, and the learned learning-rate state of the hierarchical RNN optimizer):
  each parameter tensor keeps a log step size that grows while the new gradient keeps pointing
  along the previous update and shrinks when it turns against it. Tuned Adam's best learning
  rate on the out-of-distribution benchmark's tasks spans 0.003 to 1; a rule meta-trained on
  short unrolls does not learn to keep growing its steps without a state that integrates over
  the run.

Four switches make the adaptation fast early and safe late (measured in the README, issue 4):
a warm-up of the adaptation rate (``lr_adapt_warmup``: the step size finds its scale in the first
tens of steps), a faster shrink on a clear overshoot (``lr_adapt_shrink``), per-tensor clipping
of gradients that are much larger than their running RMS (``grad_clip``; a rare large gradient
after a quiet stretch otherwise moves Adam tens of steps' worth, which a grown step size turns
into a blow-up), and slower growth once a tensor's gradient norm has fallen far below its peak
(``lr_adapt_slowdown``; near an interpolating minimum the gradient keeps one direction while the
loss is already tiny).

Both are switches (``scale_invariant``, ``nominal``); with both off the rule is the paper's LSTM
(log/sign inputs, ``output_scale`` times a linear read-out), in a pure-PyTorch implementation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import kernels
from ..preprocess import log_sign
from .base import RuleState, UpdateRule, bounded_grad, safe_sqrt, step_count

__all__ = ["GeneralLSTMRule"]


class GeneralLSTMRule(UpdateRule):
    r"""A coordinatewise LSTM with shared weights, scale-invariant inputs and an Adam nominal step.

    Per coordinate :math:`i` with gradient :math:`g_t` (superscript :math:`i` dropped), the rule
    keeps a second moment :math:`v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2` and momenta
    :math:`m^{(k)}_t = \beta_k m^{(k)}_{t-1} + (1-\beta_k) g_t`, bias-corrected like Adam
    (:math:`\hat v_t = v_t / (1-\beta_2^t)`, :math:`\hat m^{(k)}_t = m^{(k)}_t / (1-\beta_k^t)`),
    and with :math:`D_t = \sqrt{\hat v_t} + \epsilon`:

    **Inputs** (``scale_invariant=True``): :math:`g_t / D_t` and :math:`\hat m^{(k)}_t / D_t` for
    every :math:`\beta_k` in ``momentum_betas``; with ``log_features``, also
    :math:`\ell(|g_t| / D_t)` and :math:`\ell\big((\sqrt{\hat v^{fast}_t} + \epsilon) / D_t\big)`
    where :math:`v^{fast}` is a second moment with :math:`\beta = 0.9` and
    :math:`\ell(x) = \log(\max(x, e^{-p})) / p` (how large the gradient is now, relative to its
    recent and long-run typical size). Each input is a ratio of two quantities that scale alike
    with the gradient, so the inputs do not change when the loss is multiplied by a constant (up
    to :math:`\epsilon`). With ``scale_invariant=False`` the input is the paper's
    :func:`~learned_opt.preprocess.log_sign` of the raw gradient.

    **Output** (``nominal=True``): the LSTM's read-out gives two numbers per coordinate,
    :math:`(r_a, r_b) = \alpha (W^\top h_t + c)`, and

    .. math::
        a = A \tanh(r_a / A), \qquad
        \Delta_t = \eta \left( d_t\, e^{a} + r_b \right), \qquad
        d_t = -\hat m_t / D_t \ (\beta_1),

    with :math:`\eta = e^{\log\eta}` a learned base learning rate (initially ``lr``). With
    ``lr_adapt`` :math:`= \kappa > 0` the direction's step size is adapted, one log step size
    per parameter tensor :math:`P`:

    .. math::
        s_t = \operatorname{clip}\left(s_{t-1} + \kappa \cos(-g^P_t, u^P_{t-1}),\
        \pm S\right), \qquad s_0 = 0,

    and :math:`\Delta_t = \eta \left( e^{s_t} u_t + r_b \right)`, where
    :math:`u_t = d_t e^{a}` is the corrected Adam direction and :math:`S` = ``lr_adapt_bound``:
    while successive steps agree the step size grows by up to :math:`e^\kappa` per step, and it
    shrinks as fast when the gradient turns against the last step (overshoot). The cosine does
    not depend on the gradient's scale. The additive correction :math:`r_b` is not scaled by
    :math:`e^{s_t}`: a learned drift that a 1000x step size would amplify makes long runs
    diverge. (Without ``nominal``, :math:`u_t` is the network's update and
    :math:`\Delta_t = e^{s_t} u_t`.)

    Three options shape the adaptation. ``lr_adapt_warmup`` :math:`= B` makes the rate
    :math:`\kappa_t = \kappa (1 + B e^{-t/\tau})` (:math:`\tau` = ``lr_adapt_warmup_steps``):
    fast while the step size is far from its scale, slow once it is there. ``lr_adapt_shrink``
    :math:`= D` counts a cosine below :math:`-\mu` (``lr_adapt_margin``) :math:`D` times,
    :math:`c \mapsto c + (D - 1)\min(0, c + \mu)`: a clear overshoot shrinks the step fast,
    while minibatch noise (small cosines of either sign) does not bias it down.
    ``lr_adapt_slowdown`` :math:`= R > 0` counts positive cosines only ``lr_adapt_slowdown_rate``
    times once the tensor's gradient norm (a fast running RMS, :math:`\beta = 0.9`) has fallen
    below :math:`1/R` of its peak: near an interpolating minimum the gradient keeps pointing one
    way while the loss is already tiny, and a step size that keeps growing there eventually
    kicks the model out (a GRU's gradients explode).

    With ``grad_clip`` :math:`= Q > 0` each tensor's gradient is first clipped to
    :math:`\sqrt{Q}` times its running RMS norm,
    :math:`g^P_t \leftarrow g^P_t \min\big(1, \sqrt{Q \sum_P \hat v_{t-1} / \sum_P g_t^2}\big)`
    (from the second step on, and only where :math:`\sum_P \hat v_{t-1} > 0`), before anything
    else reads it. After a quiet stretch :math:`\hat v` is small, and one rare large gradient
    would otherwise move Adam's direction by up to :math:`(1-\beta_1)/\sqrt{1-\beta_2}
    \approx 3` per coordinate for tens of steps.

    The multiplicative correction :math:`e^a` is bounded in :math:`[e^{-A}, e^{A}]` (``a_bound``;
    :math:`\tanh(r/A) A` has slope 1 at 0, so small read-outs act linearly) and the additive one is
    in the units of the normalized Adam step, so neither can make the update explode in a way Adam
    would not. With zero read-out weights and bias (:meth:`reset_parameters` default)
    :math:`a = r_b = 0` and :math:`\Delta_t = \eta d_t`: exactly Adam (``betas=(beta1, beta2)``,
    ``eps``). With ``nominal=False`` the update is :math:`\alpha (W^\top h_t + c)`, one read-out,
    as in :class:`~learned_opt.rules.LSTMRule`.

    All state is per coordinate (momenta, second moments, LSTM hidden and cell states, shaped
    ``(n,)`` or ``(n, hidden_size)``) plus a shared step counter, so the rule works on the flat
    vector of the unroll and per tensor in :class:`~learned_opt.optim.LearnedOptimizer`.

    Args:
        hidden_size: LSTM units per layer.
        num_layers: stacked LSTM layers.
        scale_invariant: normalized momentum/gradient inputs (else log/sign of the raw gradient).
        nominal: correct an Adam nominal step (else the read-out is the update).
        momentum_betas: timescales of the momentum inputs (used with ``scale_invariant``).
        beta1: momentum of the nominal Adam direction.
        beta2: decay of the second moment :math:`v`.
        eps: :math:`\epsilon` of the normalization (Adam's).
        log_features: add the two log-magnitude ratio inputs (with ``scale_invariant``).
        additive: with ``nominal``, read out the additive correction :math:`r_b` too (else the
            read-out is :math:`r_a` alone and :math:`r_b = 0`: the learned part only rescales the
            Adam direction per coordinate, within :math:`[e^{-A}, e^{A}]`). The additive term is
            a per-coordinate drift of the base rate's size that neither the normalization nor
            the step-size adaptation controls; meta-trained on 100-step unrolls it made 1,000-step
            runs diverge (README, issue 4).
        lr: initial base learning rate :math:`\eta` of the nominal step.
        learn_lr: meta-learn :math:`\log\eta` (else it stays at ``log(lr)``).
        a_bound: :math:`A`, the bound on the log-scale correction.
        output_scale: :math:`\alpha`, the factor on the read-out.
        preprocess_p: :math:`p` of the log features and of the log/sign preprocessing.
        forget_bias: initial bias of the forget gates.
        lr_adapt: :math:`\kappa`, the per-tensor step-size adaptation rate (0: off). Without
            ``nominal`` the adapted step size multiplies the network's update (and :math:`u` is
            that update). The unroll passes the tensor layout (``init_state(..., numels=...)``);
            the drop-in optimizer applies the rule to each tensor whole.
        lr_adapt_bound: :math:`S`, the bound on the log step size :math:`|s_t|`.
        lr_adapt_warmup: :math:`B`, the extra adaptation rate at the start (0: none).
        lr_adapt_warmup_steps: :math:`\tau`, its decay time in steps.
        lr_adapt_shrink: :math:`D \ge 1`, the weight of cosines below :math:`-\mu` (1: symmetric).
        lr_adapt_margin: :math:`\mu \ge 0`.
        lr_adapt_slowdown: :math:`R`, the fall of the gradient norm from its peak after which the
            step size grows more slowly (0: off).
        lr_adapt_slowdown_rate: the factor on positive cosines after that fall.
        grad_clip: :math:`Q`, per-tensor clipping of the gradient's norm at :math:`\sqrt{Q}`
            times its running RMS (0: off; needs the second moment, so ``scale_invariant`` or
            ``nominal``). Per tensor, like ``lr_adapt``.
        grad_clip_warmup: :math:`C`, a looser clip early: the threshold is
            :math:`Q_t = Q (1 + C e^{-t/\tau})` (:math:`\tau` = ``lr_adapt_warmup_steps``). While a
            model's gradient norm is still growing fast (a GRU leaving its initial plateau), the
            running RMS lags it and a fixed clip slows the first tens of steps.
        grad_clip_aligned: :math:`G \ge 1`, a looser clip for a gradient that keeps pointing
            along the tensor's previous update (:math:`\cos(-g^P_t, u^P_{t-1}) > 0`): its threshold
            is :math:`G Q_t` (1: the same for all; needs ``lr_adapt``, which keeps the previous
            update). A growing gradient that agrees with the last step (a GRU leaving its
            plateau) is progress; a large one that turns against it (a ReLU MLP's noisy early
            steps) is what the clipping is for.
    """

    kind = "general-lstm"

    def __init__(
        self,
        hidden_size: int = 32,
        num_layers: int = 1,
        *,
        scale_invariant: bool = True,
        nominal: bool = True,
        momentum_betas: Sequence[float] = (0.5, 0.9, 0.99, 0.999),
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        log_features: bool = True,
        additive: bool = True,
        lr: float = 1e-3,
        learn_lr: bool = True,
        a_bound: float = 3.0,
        output_scale: float = 0.1,
        preprocess_p: float = 10.0,
        forget_bias: float = 1.0,
        lr_adapt: float = 0.0,
        lr_adapt_bound: float = math.log(1000.0),
        lr_adapt_warmup: float = 0.0,
        lr_adapt_warmup_steps: float = 20.0,
        lr_adapt_shrink: float = 1.0,
        lr_adapt_margin: float = 0.2,
        grad_clip: float = 0.0,
        grad_clip_warmup: float = 0.0,
        grad_clip_aligned: float = 1.0,
        lr_adapt_slowdown: float = 0.0,
        lr_adapt_slowdown_rate: float = 0.3,
    ) -> None:
        super().__init__()
        if hidden_size < 1 or num_layers < 1:
            raise ValueError(
                f"Invalid LSTM size: hidden_size={hidden_size}, num_layers={num_layers}"
            )
        betas = tuple(float(b) for b in momentum_betas)
        for b in (*betas, beta1, beta2):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta: {b} (must be in [0, 1))")
        if scale_invariant and not betas:
            raise ValueError("scale_invariant needs at least one momentum beta")
        if eps <= 0 or lr <= 0 or a_bound <= 0 or preprocess_p <= 0:
            raise ValueError(
                f"Invalid eps/lr/a_bound/preprocess_p: {eps}/{lr}/{a_bound}/{preprocess_p} "
                "(must be > 0)"
            )
        if lr_adapt < 0 or lr_adapt_bound <= 0:
            raise ValueError(
                f"Invalid lr_adapt/lr_adapt_bound: {lr_adapt}/{lr_adapt_bound} (must be >= 0 / > 0)"
            )
        if lr_adapt_warmup < 0 or lr_adapt_warmup_steps <= 0 or lr_adapt_shrink < 1:
            raise ValueError(
                f"Invalid lr_adapt_warmup/lr_adapt_warmup_steps/lr_adapt_shrink: "
                f"{lr_adapt_warmup}/{lr_adapt_warmup_steps}/{lr_adapt_shrink} "
                "(must be >= 0 / > 0 / >= 1)"
            )
        if lr_adapt_margin < 0 or grad_clip < 0 or grad_clip_warmup < 0:
            raise ValueError(
                f"Invalid lr_adapt_margin/grad_clip/grad_clip_warmup: {lr_adapt_margin}/"
                f"{grad_clip}/{grad_clip_warmup} (must be >= 0)"
            )
        if lr_adapt_slowdown < 0 or not 0 <= lr_adapt_slowdown_rate <= 1:
            raise ValueError(
                f"Invalid lr_adapt_slowdown/lr_adapt_slowdown_rate: {lr_adapt_slowdown}/"
                f"{lr_adapt_slowdown_rate} (must be >= 0 / in [0, 1])"
            )
        if grad_clip_aligned < 1 or (grad_clip_aligned != 1 and lr_adapt <= 0):
            raise ValueError(
                f"Invalid grad_clip_aligned: {grad_clip_aligned} (must be >= 1; other than 1 it "
                "needs lr_adapt > 0, which keeps the previous update)"
            )
        if grad_clip > 0 and not (scale_invariant or nominal):
            raise ValueError("grad_clip needs the second moment (scale_invariant or nominal)")
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.scale_invariant = bool(scale_invariant)
        self.nominal = bool(nominal)
        self.momentum_betas = betas
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self.log_features = bool(log_features)
        self.additive = bool(additive)
        self.lr = float(lr)
        self.learn_lr = bool(learn_lr)
        self.a_bound = float(a_bound)
        self.output_scale = float(output_scale)
        self.preprocess_p = float(preprocess_p)
        self.forget_bias = float(forget_bias)
        self.lr_adapt = float(lr_adapt)
        self.lr_adapt_bound = float(lr_adapt_bound)
        self.lr_adapt_warmup = float(lr_adapt_warmup)
        self.lr_adapt_warmup_steps = float(lr_adapt_warmup_steps)
        self.lr_adapt_shrink = float(lr_adapt_shrink)
        self.lr_adapt_margin = float(lr_adapt_margin)
        self.grad_clip = float(grad_clip)
        self.grad_clip_warmup = float(grad_clip_warmup)
        self.grad_clip_aligned = float(grad_clip_aligned)
        self.lr_adapt_slowdown = float(lr_adapt_slowdown)
        self.lr_adapt_slowdown_rate = float(lr_adapt_slowdown_rate)
        # Momentum state: one buffer per distinct beta (the nominal direction shares its buffer
        # with a momentum input of the same beta).
        mom: list[float] = list(betas) if self.scale_invariant else []
        if self.nominal and self.beta1 not in mom:
            mom.append(self.beta1)
        self._state_betas = tuple(mom)
        self.in_size = self.num_inputs()
        h = self.hidden_size
        for layer in range(self.num_layers):
            n_in = self.in_size if layer == 0 else h
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(n_in, 4 * h)))
            self.register_parameter(f"weight_hh_l{layer}", nn.Parameter(torch.empty(h, 4 * h)))
            self.register_parameter(f"bias_l{layer}", nn.Parameter(torch.empty(4 * h)))
        n_out = 2 if self.nominal and self.additive else 1
        self.out_weight = nn.Parameter(torch.empty(h, n_out))
        self.out_bias = nn.Parameter(torch.empty(n_out))
        if self.nominal:
            log_lr = torch.tensor(math.log(self.lr))
            if self.learn_lr:
                self.log_lr = nn.Parameter(log_lr)
            else:
                self.register_buffer("log_lr", log_lr)
        self.reset_parameters()

    # ----------------------------------------------------------------------------- set-up
    def num_inputs(self) -> int:
        """Inputs per coordinate: 1 + len(momentum_betas) (+2 with ``log_features``) with
        ``scale_invariant``, else 2 (log/sign)."""
        if not self.scale_invariant:
            return 2
        return 1 + len(self.momentum_betas) + (2 if self.log_features else 0)

    def reset_parameters(
        self, generator: torch.Generator | None = None, *, zero_output: bool | None = None
    ) -> None:
        """LSTM weights ~ U(-1/sqrt(H), 1/sqrt(H)) (``nn.LSTM``), forget gates at
        ``forget_bias``, base learning rate at ``lr``.

        The read-out starts at zero when ``zero_output`` (default: with ``nominal``), which makes
        the rule exactly Adam; otherwise it is drawn like the LSTM weights (bias zero).
        """
        if zero_output is None:
            zero_output = self.nominal
        bound = 1.0 / math.sqrt(self.hidden_size)
        h = self.hidden_size
        with torch.no_grad():
            for layer in range(self.num_layers):
                for name in ("weight_ih", "weight_hh", "bias"):
                    getattr(self, f"{name}_l{layer}").uniform_(-bound, bound, generator=generator)
                getattr(self, f"bias_l{layer}")[h : 2 * h].fill_(self.forget_bias)
            if zero_output:
                self.out_weight.zero_()
            else:
                self.out_weight.uniform_(-bound, bound, generator=generator)
            self.out_bias.zero_()
            if self.nominal:
                self.log_lr.fill_(math.log(self.lr))

    @property
    def tensor_aware(self) -> bool:
        return self.lr_adapt > 0 or self.grad_clip > 0

    def init_state(
        self, numel: int, *, like: Tensor, numels: Sequence[int] | None = None
    ) -> RuleState:
        """Zero momenta ``m{k}``, second moments ``v`` (and ``v_fast``), LSTM states ``h{l}``,
        ``c{l}`` of shape ``(numel, hidden_size)``, and the step counter.

        With ``lr_adapt``, also the log step size ``log_step`` and the previous update direction
        ``prev`` (per coordinate). With ``lr_adapt`` or ``grad_clip``, if ``numels`` (the sizes of
        the parameter tensors the ``numel`` coordinates concatenate) is given, ``tensor`` (each
        coordinate's tensor index; without it the coordinates are one tensor).
        """
        kw = dict(dtype=like.dtype, device=like.device)
        state: RuleState = {}
        if self.lr_adapt > 0:
            state["log_step"] = torch.zeros(numel, **kw)
            state["prev"] = torch.zeros(numel, **kw)
            if self.lr_adapt_slowdown > 0:
                state["grad_fast"] = torch.zeros(numel, **kw)
                state["grad_peak"] = torch.zeros(numel, **kw)
        if self.tensor_aware and numels is not None:
            if sum(numels) != numel or any(n < 0 for n in numels):
                raise ValueError(f"numels {list(numels)} do not add up to {numel}")
            sizes = torch.tensor(list(numels), device=like.device)
            ids = torch.arange(len(numels), device=like.device)
            state["tensor"] = ids.repeat_interleave(sizes, output_size=numel)
        if self._state_betas:
            for k in range(len(self._state_betas)):
                state[f"m{k}"] = torch.zeros(numel, **kw)
            state["v"] = torch.zeros(numel, **kw)
        if self.scale_invariant and self.log_features:
            state["v_fast"] = torch.zeros(numel, **kw)
        for layer in range(self.num_layers):
            state[f"h{layer}"] = torch.zeros(numel, self.hidden_size, **kw)
            state[f"c{layer}"] = torch.zeros(numel, self.hidden_size, **kw)
        state["step"] = torch.zeros((), dtype=torch.float32, device=like.device)
        return state

    def coord_dim(self, key: str) -> int | None:
        return None if key == "step" else 0

    # ----------------------------------------------------------------------------- the step
    def _inputs(
        self, grad: Tensor, moments: list[Tensor], denom: Tensor | None, v_fast_hat: Tensor | None
    ) -> Tensor:
        if not self.scale_invariant:
            return log_sign(grad, self.preprocess_p)
        assert denom is not None
        feats = [grad / denom]
        feats += [moments[self._state_betas.index(b)] / denom for b in self.momentum_betas]
        if self.log_features:
            assert v_fast_hat is not None
            p = self.preprocess_p
            floor = math.exp(-p)
            feats.append(torch.log((grad.abs() / denom).clamp_min(floor)) / p)
            ratio = (safe_sqrt(v_fast_hat) + self.eps) / denom
            feats.append(torch.log(ratio.clamp_min(floor)) / p)
        return torch.stack(feats, dim=-1)

    def _lstm(self, x: Tensor, state: RuleState) -> tuple[list[Tensor], list[Tensor]]:
        """New hidden and cell states of every layer from the inputs ``x`` (n, in): the whole
        stack in one fused call on CPU in float32 when ``x`` is a constant (first order), else
        per layer one gate product and the fused (or PyTorch) cell."""
        layers = range(self.num_layers)
        hs = [state[f"h{layer}"] for layer in layers]
        cs = [state[f"c{layer}"] for layer in layers]
        w_ih = [getattr(self, f"weight_ih_l{layer}") for layer in layers]
        w_hh = [getattr(self, f"weight_hh_l{layer}") for layer in layers]
        bias = [getattr(self, f"bias_l{layer}") for layer in layers]
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

    def forward(self, grad: Tensor, state: RuleState) -> tuple[Tensor, RuleState]:
        step = step_count(state, grad)
        t = float(step)
        grad = bounded_grad(grad)  # no finite gradient can overflow a square or a sum below
        new_state: RuleState = {"step": step}
        ids = state.get("tensor")
        if ids is not None:
            new_state["tensor"] = ids
        if self.grad_clip > 0 and t > 1:
            v_hat = state["v"] / (1 - self.beta2 ** (t - 1))
            grad = self._clipped(grad, v_hat, ids, t, state.get("prev"))
        moments: list[Tensor] = []  # bias-corrected momenta, by _state_betas
        denom = v_fast_hat = None
        raw_m: dict[float, Tensor] = {}
        if self._state_betas:
            for k, beta in enumerate(self._state_betas):
                m = torch.lerp(state[f"m{k}"], grad, 1 - beta)
                new_state[f"m{k}"] = m
                raw_m[beta] = m
                moments.append(m / (1 - beta**t))
            v = state["v"] * self.beta2 + (1 - self.beta2) * grad * grad
            new_state["v"] = v
            # Adam's operation order (AdamRule), so that the nominal step matches torch.optim.
            denom = safe_sqrt(v) / (1 - self.beta2**t) ** 0.5 + self.eps
        if self.scale_invariant and self.log_features:
            v_fast = state["v_fast"] * 0.9 + 0.1 * grad * grad
            new_state["v_fast"] = v_fast
            v_fast_hat = v_fast / (1 - 0.9**t)
        x = self._inputs(grad, moments, denom, v_fast_hat)
        hs, cs = self._lstm(x, state)
        for layer in range(self.num_layers):
            new_state[f"h{layer}"] = hs[layer]
            new_state[f"c{layer}"] = cs[layer]
        out = torch.addmm(self.out_bias, hs[-1], self.out_weight) * self.output_scale
        if not self.nominal:
            update = out.squeeze(-1)
            if self.lr_adapt > 0:
                update = self._adapted(grad, update, state, new_state, t)
            return update, new_state
        assert denom is not None
        direction = -(raw_m[self.beta1] / (1 - self.beta1**t)) / denom
        a = self.a_bound * torch.tanh(out[:, 0] / self.a_bound)
        update = direction * torch.exp(a)
        if self.lr_adapt > 0:  # the adapted size scales the direction, not the additive term
            update = self._adapted(grad, update, state, new_state, t)
        if self.additive:
            update = update + out[:, 1]
        return torch.exp(self.log_lr) * update, new_state

    @staticmethod
    def _tensor_sums(products: Tensor, ids: Tensor | None) -> Tensor:
        """Sums of the rows of ``products`` (k, n) over each tensor's coordinates, broadcast back
        to the coordinates ((k, n); (k, 1) when ``ids`` is None: one tensor)."""
        if ids is None:
            return products.sum(dim=1, keepdim=True)
        n = int(ids[-1]) + 1 if ids.numel() else 0
        return products.new_zeros(products.shape[0], n).index_add_(1, ids, products)[:, ids]

    def _warmup(self, extra: float, t: float) -> float:
        """``1 + extra exp(-t / lr_adapt_warmup_steps)``: the factor of both warm-ups (the
        adaptation rate's and the clip threshold's)."""
        return 1.0 + extra * math.exp(-t / self.lr_adapt_warmup_steps)

    def _clipped(
        self, grad: Tensor, v_hat: Tensor, ids: Tensor | None, t: float, prev: Tensor | None
    ) -> Tensor:
        """``grad`` with each tensor's norm clipped at ``sqrt(Q_t)`` times its running RMS
        norm ``sqrt(sum v_hat)`` (unchanged where that is zero: no history yet), with
        ``Q_t = grad_clip (1 + grad_clip_warmup exp(-t / lr_adapt_warmup_steps))``, times
        ``grad_clip_aligned`` where ``-grad`` points along the previous update ``prev``."""
        if self.grad_clip_aligned != 1.0 and prev is not None:
            g2, ref, dot = self._tensor_sums(torch.stack((grad * grad, v_hat, -grad * prev)), ids)
            aligned = torch.where(dot > 0, self.grad_clip_aligned, 1.0)
        else:
            g2, ref = self._tensor_sums(torch.stack((grad * grad, v_hat)), ids)
            aligned = 1.0
        limit = self.grad_clip * self._warmup(self.grad_clip_warmup, t) * ref * aligned
        # safe_sqrt: a zero meta-gradient where the ratio is 0, not 0 * inf = nan
        factor = safe_sqrt(limit / g2.clamp_min(1e-30)).clamp(max=1.0)
        return grad * torch.where(ref > 0, factor, torch.ones_like(factor))

    def _adapted(
        self, grad: Tensor, update: Tensor, state: RuleState, new_state: RuleState, t: float
    ) -> Tensor:
        """``update`` times the adapted step size ``exp(s)``, with
        ``s <- clip(s + kappa_t * c)`` per tensor, ``c`` the cosine of ``-g`` and the previous
        update (shaped by ``lr_adapt_shrink``); records ``s`` and ``update``."""
        prev = state["prev"]
        dot, g2, p2 = self._tensor_sums(
            torch.stack((-grad * prev, grad * grad, prev * prev)), state.get("tensor")
        )
        # cos = 0 where either vector is zero (the first step: no previous update yet; a tensor
        # with a zero gradient); safe_sqrt: a zero meta-gradient there, not 0 * inf = nan
        # |g|^2 |p|^2 can overflow where each factor does not: then |g| |p| (the same value up
        # to rounding; the product form is kept where it is finite, for identical steps)
        norms = g2 * p2
        norms = torch.where(torch.isinf(norms), safe_sqrt(g2) * safe_sqrt(p2), safe_sqrt(norms))
        cos = dot / norms.clamp_min(1e-30)
        if self.lr_adapt_shrink != 1.0:
            cos = cos + (self.lr_adapt_shrink - 1.0) * (cos + self.lr_adapt_margin).clamp(max=0.0)
        if self.lr_adapt_slowdown > 0:
            fast = state["grad_fast"] * 0.9 + 0.1 * g2
            norm = safe_sqrt(fast / (1 - 0.9**t))
            peak = torch.maximum(state["grad_peak"], norm)
            new_state["grad_fast"] = fast
            new_state["grad_peak"] = peak
            slow = (cos > 0) & (norm * self.lr_adapt_slowdown < peak)
            cos = torch.where(slow, cos * self.lr_adapt_slowdown_rate, cos)
        rate = self.lr_adapt * self._warmup(self.lr_adapt_warmup, t)
        bound = self.lr_adapt_bound
        log_step = (state["log_step"] + rate * cos).clamp(-bound, bound)
        new_state["log_step"] = log_step
        new_state["prev"] = update
        return update * torch.exp(log_step)

    def config(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "scale_invariant": self.scale_invariant,
            "nominal": self.nominal,
            "momentum_betas": list(self.momentum_betas),
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "log_features": self.log_features,
            "additive": self.additive,
            "lr": self.lr,
            "learn_lr": self.learn_lr,
            "a_bound": self.a_bound,
            "output_scale": self.output_scale,
            "preprocess_p": self.preprocess_p,
            "forget_bias": self.forget_bias,
            "lr_adapt": self.lr_adapt,
            "lr_adapt_bound": self.lr_adapt_bound,
            "lr_adapt_warmup": self.lr_adapt_warmup,
            "lr_adapt_warmup_steps": self.lr_adapt_warmup_steps,
            "lr_adapt_shrink": self.lr_adapt_shrink,
            "lr_adapt_margin": self.lr_adapt_margin,
            "grad_clip": self.grad_clip,
            "grad_clip_warmup": self.grad_clip_warmup,
            "grad_clip_aligned": self.grad_clip_aligned,
            "lr_adapt_slowdown": self.lr_adapt_slowdown,
            "lr_adapt_slowdown_rate": self.lr_adapt_slowdown_rate,
        }
