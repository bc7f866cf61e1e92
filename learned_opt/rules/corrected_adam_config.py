"""The configuration of :class:`~learned_opt.rules.LSTMCorrectedAdamRule`, and how configurations
saved under the rule's former name (checkpoint kind ``"general-lstm"``) are read.

:class:`LSTMCorrectedAdamConfig`'s defaults are the configuration of the shipped weights
``learned_opt.pretrained`` ``"general"`` (the default weights' rule, ``"general-v4"``, adapts
the step size more slowly, ``lr_adapt=0.025``, ``lr_adapt_shrink=1.5``, and averages Adam's
moments over fewer steps, ``beta1=0.8``, ``beta2=0.95``): an Adam step corrected by an LSTM
with 16 units, whose read-out scales the step per coordinate by at most ``e^1``, with
per-tensor step-size adaptation, per-tensor gradient clipping with a warm-up, and a slowdown of
the adaptation near a minimum.

Options of the former keyword interface that nothing shipped or measured are gone:
:data:`REMOVED_OPTIONS` maps each to the one value the rule still implements. A saved
configuration that carries one at that value loads (the key is dropped); at any other value it
raises a ``ValueError`` that names the option.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GENERAL_LSTM_DEFAULTS",
    "LSTMCorrectedAdamConfig",
    "REMOVED_OPTIONS",
    "options_from_saved",
]


@dataclass(frozen=True)
class LSTMCorrectedAdamConfig:
    r"""An Adam step corrected per coordinate by a small LSTM, with per-tensor step-size
    adaptation and gradient clipping. The defaults are the shipped configuration.

    The LSTM (``hidden_size`` units, ``num_layers`` layers, weights shared by all coordinates)
    reads scale-invariant features of each coordinate's gradient history; its read-out
    :math:`r` scales the Adam direction :math:`d` (``beta1``, ``beta2``, ``eps``) by
    :math:`e^{a}`, :math:`a = A \tanh(r / A)` (``a_bound`` :math:`= A`). Each parameter tensor
    has a log step size :math:`s` that grows while the gradient keeps pointing along the last
    update and shrinks when it turns against it (``lr_adapt*``), and its gradient is clipped at
    :math:`\sqrt{Q}` times its running RMS norm (``grad_clip*``). The step is
    :math:`\eta\, e^{s} d\, e^{a}`. See :class:`~learned_opt.rules.LSTMCorrectedAdamRule` for
    the formulas.

    Attributes:
        hidden_size: LSTM units per layer.
        num_layers: stacked LSTM layers.
        lr: the base learning rate :math:`\eta` of the Adam step.
        learn_lr: meta-learn :math:`\log\eta` (else it stays at ``log(lr)``, a buffer).
        beta1: momentum of the Adam direction.
        beta2: decay of the second moment.
        eps: Adam's :math:`\epsilon`.
        a_bound: :math:`A`, the bound on the log-scale correction: the LSTM scales the Adam step
            by a factor in :math:`[e^{-A}, e^{A}]`.
        additive: also read out an additive correction :math:`r_b` (units of the normalized
            Adam step, not scaled by :math:`e^{s}`). Meta-trained on 100-step unrolls it made
            1,000-step runs diverge; off in the shipped configuration.
        lr_adapt: :math:`\kappa`, the rate of the per-tensor step-size adaptation (0: off).
        lr_adapt_bound: :math:`S`, the bound on :math:`|s|`.
        lr_adapt_warmup: :math:`B`: the rate is :math:`\kappa (1 + B e^{-t/\tau})`.
        lr_adapt_warmup_steps: :math:`\tau`, the decay time of both warm-ups, in steps.
        lr_adapt_shrink: :math:`D \ge 1`: cosines below :math:`-\mu` count :math:`D` times.
        lr_adapt_margin: :math:`\mu \ge 0`.
        lr_adapt_slowdown: :math:`R`: once a tensor's gradient norm has fallen below
            :math:`1/R` of its peak, positive cosines count ``lr_adapt_slowdown_rate`` times
            (0: off).
        lr_adapt_slowdown_rate: that factor, in [0, 1].
        lr_size_ref: :math:`N_0`: a tensor of :math:`n > N_0` coordinates starts at
            :math:`s = \tfrac12 \log(N_0 / n)`, a step :math:`\sqrt{N_0 / n}` times the nominal
            one (for a square matrix, one over its width: how muP scales Adam's rate for hidden
            layers), which the adaptation then moves as any other; 0: every tensor starts at
            :math:`s = 0`.
        grad_clip: :math:`Q`: each tensor's gradient norm is clipped at :math:`\sqrt{Q_t}` times
            its running RMS norm (0: off).
        grad_clip_warmup: :math:`C`: :math:`Q_t = Q (1 + C e^{-t/\tau})`, looser early.
        controller_hidden: units of a learned per-tensor gain on the step-size adaptation (0:
            none, the shipped configuration): a small MLP of each tensor's scale-free
            statistics (the cosine, its running mean, the gradient norm against its peak, the
            log step size, the step) whose output :math:`\delta` multiplies the adaptation rate
            by :math:`e^{\delta}`. Its last layer starts at zero (the hand-designed rule).
            Needs ``lr_adapt > 0`` and ``lr_adapt_slowdown > 0``.
        controller_bound: :math:`|\delta|` is at most this (:math:`B \tanh(o / B)`).
        controller_drift: :math:`D`: a second output of the controller, a learned term
            :math:`d = D \tanh(o_2) \in [-D, D]` added to the (gained) cosine, so that each
            change of the log step size is :math:`\kappa_t (c\,e^{\delta} + d)`: a drift that
            can decay or grow a tensor's step where the cosine alone would not (0: none; its
            layer starts at zero). Needs ``controller_hidden > 0``.
        lr_adapt_learned: the step-size adaptation is the controller's alone: each change of
            the log step size is :math:`\kappa_t d`, the drift, whose pre-activation adds a
            linear function of the six statistics to the hidden layer's (``controller_linear``,
            zero at the start); the hand-designed cosine rule (its shrink and slowdown) and the
            gain are not applied. With the controller at zero the step size keeps its start
            (no adaptation), so meta-training learns the adaptation from nothing. Needs
            ``controller_drift > 0``.
        controller_size: the controller also reads each tensor's size, :math:`\log(n / 10^3)
            / \log(10^3)` for a tensor of :math:`n` coordinates, through weights of its own
            that start at zero (``controller_size_w``, and ``controller_size_linear`` with
            ``lr_adapt_learned``): the rule is unchanged until they are learned, and can then
            adapt tensors of different sizes differently from the first step. Needs
            ``controller_hidden > 0``.
        orthogonal: the direction of a matrix-shaped parameter (2 or more dimensions, read as
            ``shape[0]`` rows) is Muon's instead of Adam's: its Nesterov momentum
            :math:`\beta_1 m_t + (1-\beta_1) g_t` orthogonalized as a matrix and scaled to
            Adam's root mean square (:func:`~learned_opt.rules.orthogonal.orthogonal_direction`);
            vectors keep Adam's. Needs each tensor's shape: the drop-in optimizer gives it
            (one state per tensor), a meta-learner the shapes of the tensors its flat vector
            holds (``init_state(..., shapes=...)``).
        orthogonal_rms: with ``orthogonal``, a matrix's direction has the root mean square of
            its Adam direction (:math:`\hat m_t / D_t` over the tensor) instead of Muon's 0.2:
            as large as Adam's first steps (about 1), and as Adam's later ones.
        orthogonal_mix: with ``orthogonal``, a learned per-tensor mix of the two directions:
            a second read-out of the LSTM, averaged over a matrix's coordinates, gives
            :math:`z`, and the matrix moves along :math:`d_M + \tanh(z)\,(d_A - d_M)` (Muon's
            :math:`d_M`, Adam's :math:`d_A`): Adam's at :math:`\tanh(z) = 1`, beyond Muon's
            below 0. Its weights start at zero (Muon's direction) and stay learnable with
            ``learn_lstm=False``.
        direction_correction: a learned correction of where each tensor moves, not of how far:
            a third read-out of the LSTM, :math:`c` per coordinate (times 0.1, as the first
            read-out), is added to the direction :math:`u = d\,e^{a}` and the sum is rescaled
            to :math:`u`'s root mean square over the tensor,
            :math:`u' = (u + c)\,\|u\| / \|u + c\|` (the per-step RMS normalization of
            Celo2's learned update, here around the hand-designed direction): the step-size
            adaptation keeps each tensor's step length, the read-out turns its direction. Its
            weights start at zero (the rule unchanged, step for step) and stay learnable with
            ``learn_lstm=False``. Needs ``nominal``.
        learn_lstm: meta-learn the LSTM and its read-out (``False``: they are fixed, so a
            meta-trainer learns only the rest, e.g. the controller).
        lstm: the per-coordinate LSTM and its read-out. ``False``: none (:math:`a = 0`): the step
            is the hand-designed direction moved by the per-tensor step size alone (the
            adaptation, learned or not), step for step the rule with its read-out at zero; the
            state keeps Adam's momentum and second moment and the last direction (12 bytes per
            parameter in float32 instead of 160 with 16 units). Needs ``nominal``, and none of
            the other read-outs (``additive``, ``orthogonal_mix``, ``direction_correction``).
        scale_invariant: ablation switch (measured; README): ``False`` feeds the LSTM the
            paper's log/sign preprocessing of the raw gradient instead of the normalized
            momenta and gradient.
        nominal: ablation switch (measured; README): ``False`` makes the read-out the update
            itself (times :math:`e^{s}`), with no Adam step, so ``lr``, ``learn_lr``,
            ``a_bound`` and ``additive`` then have no effect. Not both switches off: that is
            the paper's :class:`~learned_opt.rules.LSTMRule`.
    """

    hidden_size: int = 16
    num_layers: int = 1
    lr: float = 0.01
    learn_lr: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    a_bound: float = 1.0
    additive: bool = False
    lr_adapt: float = 0.1
    lr_adapt_bound: float = math.log(1000.0)
    lr_adapt_warmup: float = 5.0
    lr_adapt_warmup_steps: float = 20.0
    lr_adapt_shrink: float = 3.0
    lr_adapt_margin: float = 0.2
    lr_adapt_slowdown: float = 30.0
    lr_adapt_slowdown_rate: float = 0.3
    lr_size_ref: float = 0.0
    grad_clip: float = 2.0
    grad_clip_warmup: float = 3.0
    controller_hidden: int = 0
    controller_bound: float = 2.0
    controller_drift: float = 0.0
    lr_adapt_learned: bool = False
    controller_size: bool = False
    orthogonal: bool = False
    orthogonal_rms: bool = False
    orthogonal_mix: bool = False
    direction_correction: bool = False
    learn_lstm: bool = True
    lstm: bool = True
    scale_invariant: bool = True
    nominal: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # plain Python values, as saved in checkpoints
            kind = {"int": int, "bool": bool}.get(str(f.type), float)
            object.__setattr__(self, f.name, kind(getattr(self, f.name)))
        self._validate()

    def _validate(self) -> None:
        if self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError(
                f"Invalid LSTM size: hidden_size={self.hidden_size}, num_layers={self.num_layers}"
            )
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"Invalid {name}: {getattr(self, name)} (must be in [0, 1))")
        for name in ("eps", "lr", "a_bound", "lr_adapt_bound", "lr_adapt_warmup_steps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Invalid {name}: {getattr(self, name)} (must be > 0)")
        for name in ("lr_adapt", "lr_adapt_warmup", "lr_adapt_margin", "lr_adapt_slowdown",
                     "lr_size_ref"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"Invalid {name}: {getattr(self, name)} (must be >= 0)")
        for name in ("grad_clip", "grad_clip_warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"Invalid {name}: {getattr(self, name)} (must be >= 0)")
        if self.controller_hidden < 0 or self.controller_bound <= 0:
            raise ValueError(
                f"Invalid controller: hidden {self.controller_hidden}, bound "
                f"{self.controller_bound} (need hidden >= 0, bound > 0)"
            )
        if self.controller_drift < 0 or (self.controller_drift > 0 and self.controller_hidden < 1):
            raise ValueError(
                f"Invalid controller_drift: {self.controller_drift} (must be >= 0, and > 0 only "
                "with controller_hidden > 0)"
            )
        if self.lr_adapt_learned and self.controller_drift <= 0:
            raise ValueError(
                "lr_adapt_learned makes the controller's drift the whole step-size adaptation: "
                "it needs controller_drift > 0 (and controller_hidden > 0)"
            )
        if self.controller_size and self.controller_hidden < 1:
            raise ValueError("controller_size is an input of the controller: it needs "
                             "controller_hidden > 0")  # fmt: skip
        if self.controller_hidden > 0 and not (self.lr_adapt > 0 and self.lr_adapt_slowdown > 0):
            raise ValueError(
                "controller_hidden > 0 gates the step-size adaptation: it needs lr_adapt > 0 "
                "and lr_adapt_slowdown > 0"
            )
        if self.lr_adapt_shrink < 1:
            raise ValueError(f"Invalid lr_adapt_shrink: {self.lr_adapt_shrink} (must be >= 1)")
        if not 0 <= self.lr_adapt_slowdown_rate <= 1:
            raise ValueError(
                f"Invalid lr_adapt_slowdown_rate: {self.lr_adapt_slowdown_rate} (must be in [0, 1])"
            )
        if not (self.scale_invariant or self.nominal):
            raise ValueError(
                "scale_invariant=False with nominal=False is the paper's LSTM: use "
                "learned_opt.rules.LSTMRule"
            )
        if self.orthogonal_rms and not self.orthogonal:
            raise ValueError("orthogonal_rms scales the orthogonal direction: it needs orthogonal")
        if self.orthogonal_mix and not self.orthogonal:
            raise ValueError(
                "orthogonal_mix mixes Adam's and Muon's directions: it needs orthogonal"
            )
        if not self.lstm and not self.nominal:
            raise ValueError("lstm=False leaves the nominal direction alone: it needs nominal")
        if not self.lstm and (self.additive or self.orthogonal_mix or self.direction_correction):
            raise ValueError(
                "additive, orthogonal_mix and direction_correction are read-outs of the LSTM: "
                "they need lstm=True"
            )
        if self.direction_correction and not self.nominal:
            raise ValueError("direction_correction turns the nominal direction: it needs nominal")
        if self.orthogonal and not self.nominal:
            raise ValueError("orthogonal replaces the nominal Adam direction: it needs nominal")
        if self.lr_size_ref > 0 and not self.lr_adapt > 0:
            raise ValueError(
                "lr_size_ref sets the adapted step size's start: it needs lr_adapt > 0"
            )

    @property
    def tensor_aware(self) -> bool:
        """Whether a coordinate's update depends on the rest of its tensor (adaptation or
        clipping on)."""
        return self.lr_adapt > 0 or self.grad_clip > 0

    def replace(self, **changes: Any) -> LSTMCorrectedAdamConfig:
        """A copy with ``changes`` (options removed from the rule are dropped at their one
        remaining value and refused at any other, see :data:`REMOVED_OPTIONS`)."""
        return dataclasses.replace(self, **_without_removed(changes))

    def to_dict(self) -> dict[str, Any]:
        """The plain dictionary saved in checkpoints (the rule's ``config()``)."""
        return dataclasses.asdict(self)


#: Options of the former keyword interface that are gone, with the one value the rule still
#: implements (their former defaults): the momentum timescales of the inputs, the two
#: log-magnitude inputs, the read-out scale, the scale of the log features, the initial forget
#: bias, and ``grad_clip_aligned`` (a looser clip for gradients along the last update: measured
#: worse, never shipped).
REMOVED_OPTIONS: dict[str, Any] = {
    "momentum_betas": (0.5, 0.9, 0.99, 0.999),
    "log_features": True,
    "output_scale": 0.1,
    "preprocess_p": 10.0,
    "forget_bias": 1.0,
    "grad_clip_aligned": 1.0,
}

#: The defaults of the former keyword interface (``GeneralLSTMRule(...)``), which configurations
#: saved under kind ``"general-lstm"`` and ``--rule-kwargs`` of that kind leave implicit: a
#: 32-unit LSTM that is exactly Adam (lr 1e-3) at initialization, with a learned base learning
#: rate, the additive correction, and no adaptation or clipping.
GENERAL_LSTM_DEFAULTS = LSTMCorrectedAdamConfig(
    hidden_size=32,
    lr=1e-3,
    learn_lr=True,
    a_bound=3.0,
    additive=True,
    lr_adapt=0.0,
    lr_adapt_warmup=0.0,
    lr_adapt_shrink=1.0,
    lr_adapt_slowdown=0.0,
    grad_clip=0.0,
    grad_clip_warmup=0.0,
)


def _same(value: Any, kept: Any) -> bool:
    if isinstance(kept, tuple):
        return isinstance(value, (list, tuple)) and tuple(float(v) for v in value) == kept
    if isinstance(kept, bool):
        return isinstance(value, (bool, int)) and bool(value) == kept
    return isinstance(value, (int, float)) and float(value) == kept


def _without_removed(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` without the removed ones, each of which must have its one remaining value."""
    out = {}
    for key, value in options.items():
        if key not in REMOVED_OPTIONS:
            out[key] = value
        elif not _same(value, REMOVED_OPTIONS[key]):
            raise ValueError(
                f"The option {key}={value!r} was removed from the LSTM-corrected Adam rule "
                f"(general-lstm): only {key}={REMOVED_OPTIONS[key]!r} is implemented, so this "
                "configuration cannot be reproduced"
            )
    unknown = sorted(set(out) - {f.name for f in dataclasses.fields(LSTMCorrectedAdamConfig)})
    if unknown:
        raise ValueError(f"Unknown options of the LSTM-corrected Adam rule: {unknown}")
    return out


def options_from_saved(
    saved: Mapping[str, Any], defaults: LSTMCorrectedAdamConfig = GENERAL_LSTM_DEFAULTS
) -> LSTMCorrectedAdamConfig:
    """The configuration a saved dictionary describes: its options over ``defaults`` (by default
    those of the former keyword interface, which saved ``"general-lstm"`` configurations and
    ``--rule-kwargs`` leave implicit).

    Raises:
        ValueError: a removed option at a value other than its remaining one, an unknown option,
            or an invalid value.
    """
    return defaults.replace(**dict(saved))
